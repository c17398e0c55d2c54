//! Integration tests of `agora_net::tls`: certificates, mutual TLS over QUIC on loopback,
//! and the errors users see when certificates do not match.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use agora_net::frame::{read_frame, write_frame};
use agora_net::tls::{self, CertDir, Identity, Role};
use agora_proto::v1::Ping;

/// Upper bound on every test step: nothing here should take more than a few seconds.
const STEP: Duration = Duration::from_secs(20);

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

fn loopback() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

/// A master endpoint on loopback whose accept loop completes every incoming handshake (and
/// reports its outcome), echoing one Ping frame per bi stream on accepted connections.
struct Master {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    outcomes: tokio::sync::mpsc::UnboundedReceiver<Result<Option<Role>, String>>,
}

fn start_master(certs: &CertDir) -> Master {
    let id = Identity::from_cert_dir(certs, Role::Master).unwrap();
    let endpoint = tls::server_endpoint(loopback(), &id).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, outcomes) = tokio::sync::mpsc::unbounded_channel();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(tls::peer_role(&conn)));
                        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                            let ping: Option<Ping> = read_frame(&mut recv).await.unwrap();
                            let ping = ping.expect("a ping frame");
                            write_frame(&mut send, &Ping { seq: ping.seq + 1 })
                                .await
                                .unwrap();
                            send.finish().unwrap();
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    Master {
        endpoint,
        addr,
        outcomes,
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The DER of the (first) certificate in a PEM file.
fn cert_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(&pem)
        .unwrap()
        .to_vec()
}

/// A certificate's subject alternative names, as text to search.
fn sans_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    format!(
        "{:?}",
        cert.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
    )
}

#[tokio::test]
async fn mutual_tls_round_trip_and_peer_roles() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let certs =
        tls::init_cert_dir(&dir, &["master.example.com".into(), "10.1.2.3".into()]).unwrap();
    assert_eq!(mode(&dir), 0o700);
    for role in Role::ALL {
        assert!(certs.cert(role).is_file(), "{role} cert");
        assert_eq!(mode(&certs.key(role)), 0o600, "{role} key mode");
    }
    assert_eq!(mode(&dir.join("ca.key")), 0o600);

    // The master certificate names MASTER_SERVER_NAME, loopback and the extra names.
    let der = cert_der(&certs.cert(Role::Master));
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = sans_of(&cert);
    for name in [
        tls::MASTER_SERVER_NAME,
        "localhost",
        "master.example.com",
        "[127, 0, 0, 1]",
        "[10, 1, 2, 3]",
    ] {
        assert!(sans.contains(name), "{name} missing from {sans}");
    }

    let mut master = start_master(&certs);
    for role in [Role::Agent, Role::Client] {
        let id = Identity::from_cert_dir(&certs, role).unwrap();
        assert_eq!(id.clone().role(), Some(role));
        let ep = tls::client_endpoint(master.addr, &id).unwrap();
        let conn = bounded("connect", tls::connect(&ep, master.addr))
            .await
            .unwrap();
        assert_eq!(
            tls::peer_role(&conn),
            Some(Role::Master),
            "client sees the master"
        );
        let server_saw = bounded("server outcome", master.outcomes.recv())
            .await
            .unwrap();
        assert_eq!(server_saw, Ok(Some(role)), "master sees the {role}");

        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        bounded("write", write_frame(&mut send, &Ping { seq: 41 }))
            .await
            .unwrap();
        send.finish().unwrap();
        let pong: Option<Ping> = bounded("read", read_frame(&mut recv)).await.unwrap();
        assert_eq!(pong, Some(Ping { seq: 42 }));
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
    }
    master.endpoint.close(0u32.into(), b"bye");
}

#[tokio::test]
async fn master_refuses_certificate_from_another_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = tls::init_cert_dir(&tmp.path().join("ours"), &[]).unwrap();
    let theirs = tls::init_cert_dir(&tmp.path().join("theirs"), &[]).unwrap();
    let mut master = start_master(&ours);

    // Trusts our CA (so the master passes), but presents a certificate of another CA.
    let id = Identity::load(
        &ours.ca(),
        &theirs.cert(Role::Agent),
        &theirs.key(Role::Agent),
    )
    .unwrap();
    let ep = tls::client_endpoint(master.addr, &id).unwrap();
    let err = bounded("connect", tls::connect(&ep, master.addr))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("client error: {err}");
    assert!(err.contains("refused this client's certificate"), "{err}");
    assert!(err.contains(&master.addr.to_string()), "{err}");
    assert!(err.contains("agora certs init"), "{err}");
    let server_saw = bounded("server outcome", master.outcomes.recv())
        .await
        .unwrap();
    assert!(
        server_saw.is_err(),
        "master must not accept: {server_saw:?}"
    );
    eprintln!("server error: {}", server_saw.unwrap_err());
}

#[tokio::test]
async fn client_refuses_master_from_another_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = tls::init_cert_dir(&tmp.path().join("ours"), &[]).unwrap();
    let theirs = tls::init_cert_dir(&tmp.path().join("theirs"), &[]).unwrap();
    let master = start_master(&ours);

    // Our own certificate and key are fine for the master, but we trust the other CA.
    let id = Identity::load(
        &theirs.ca(),
        &ours.cert(Role::Client),
        &ours.key(Role::Client),
    )
    .unwrap();
    let ep = tls::client_endpoint(master.addr, &id).unwrap();
    let err = bounded("connect", tls::connect(&ep, master.addr))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("client error: {err}");
    assert!(
        err.contains("presented a certificate this client does not trust"),
        "{err}"
    );
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tls::init_cert_dir(tmp.path(), &[]).unwrap();
    let mut master = start_master(&certs);

    let ep = tls::client_endpoint_without_identity(master.addr, &certs.ca()).unwrap();
    let err = bounded("connect", tls::connect(&ep, master.addr))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("client error: {err}");
    assert!(err.contains("refused this client's certificate"), "{err}");
    assert!(err.contains("certificate required"), "{err}");
    let server_saw = bounded("server outcome", master.outcomes.recv())
        .await
        .unwrap();
    assert!(
        server_saw.is_err(),
        "master must not accept: {server_saw:?}"
    );
}

/// Documents when a refused client certificate becomes visible to a plain quinn client: the
/// client's handshake completes (TLS 1.3 client auth is checked by the server after the
/// client's Finished) and the close with the TLS alert arrives afterwards.
#[tokio::test]
async fn refused_client_certificate_shows_up_after_the_client_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tls::init_cert_dir(tmp.path(), &[]).unwrap();
    let _master = start_master(&certs);
    let addr = _master.addr;
    let ep = tls::client_endpoint_without_identity(addr, &certs.ca()).unwrap();
    let connecting = ep.connect(addr, tls::MASTER_SERVER_NAME).unwrap();
    let outcome = bounded("raw handshake", connecting).await;
    let close = match outcome {
        Ok(conn) => {
            eprintln!("quinn: handshake completed on the client; waiting for the close");
            bounded("close", conn.closed()).await
        }
        Err(e) => {
            eprintln!("quinn: handshake itself failed");
            e
        }
    };
    eprintln!("close reason: {close:?}");
    match close {
        quinn::ConnectionError::ConnectionClosed(c) => {
            assert_eq!(
                u64::from(c.error_code),
                0x100 + 116,
                "certificate_required alert"
            )
        }
        other => panic!("unexpected close: {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_master_times_out_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tls::init_cert_dir(tmp.path(), &[]).unwrap();
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let addr = silent.local_addr().unwrap();
    let id = Identity::from_cert_dir(&certs, Role::Client).unwrap();
    let ep = tls::client_endpoint(addr, &id).unwrap();
    let err = bounded(
        "connect",
        tls::connect_within(&ep, addr, Duration::from_millis(300)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        format!("no answer from the master at {addr} within 300ms: is it running? check --master / AGORA_MASTER")
    );
}

#[test]
fn init_cert_dir_twice_reuses_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tls::init_cert_dir(tmp.path(), &[]).unwrap();
    let ca = std::fs::read(certs.ca()).unwrap();
    let ca_key = std::fs::read(tmp.path().join("ca.key")).unwrap();
    let agent = std::fs::read(certs.cert(Role::Agent)).unwrap();
    std::fs::remove_file(certs.cert(Role::Client)).unwrap();

    let again = tls::init_cert_dir(tmp.path(), &[]).unwrap();
    assert_eq!(again, certs);
    assert_eq!(std::fs::read(certs.ca()).unwrap(), ca, "ca.pem unchanged");
    assert_eq!(
        std::fs::read(tmp.path().join("ca.key")).unwrap(),
        ca_key,
        "ca.key unchanged"
    );
    assert_eq!(
        std::fs::read(certs.cert(Role::Agent)).unwrap(),
        agent,
        "existing certs kept"
    );
    assert!(certs.cert(Role::Client).is_file(), "missing cert rewritten");
    assert!(std::fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
}

/// The client certificate re-issued by a reused CA still works against a master of that CA.
#[tokio::test]
async fn certificate_signed_by_a_reused_ca_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tls::init_cert_dir(tmp.path(), &[]).unwrap();
    std::fs::remove_file(certs.key(Role::Client)).unwrap();
    tls::init_cert_dir(tmp.path(), &[]).unwrap();
    let master = start_master(&certs);
    let id = Identity::from_cert_dir(&certs, Role::Client).unwrap();
    let ep = tls::client_endpoint(master.addr, &id).unwrap();
    let conn = bounded("connect", tls::connect(&ep, master.addr))
        .await
        .unwrap();
    assert_eq!(tls::peer_role(&conn), Some(Role::Master));
}

#[test]
fn init_cert_dir_refuses_a_ca_without_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let certs = tls::init_cert_dir(tmp.path(), &[]).unwrap();
    tls::init_cert_dir(other.path(), &[]).unwrap();
    // A CA key that does not match ca.pem.
    std::fs::copy(other.path().join("ca.key"), tmp.path().join("ca.key")).unwrap();
    std::fs::remove_file(certs.cert(Role::Agent)).unwrap();
    let err = tls::init_cert_dir(tmp.path(), &[]).unwrap_err().to_string();
    assert!(
        err.contains("is not the key of the CA certificate"),
        "{err}"
    );
    // No CA key at all.
    std::fs::remove_file(tmp.path().join("ca.key")).unwrap();
    let err = tls::init_cert_dir(tmp.path(), &[]).unwrap_err().to_string();
    assert!(err.contains("ca.key does not"), "{err}");
}

#[test]
fn load_errors_name_the_file_and_suggest_certs_init() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = CertDir::new(tmp.path());
    let err = Identity::from_cert_dir(&certs, Role::Agent)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&certs.ca().display().to_string()), "{err}");
    assert!(err.contains("agora certs init"), "{err}");

    tls::init_cert_dir(tmp.path(), &[]).unwrap();
    std::fs::remove_file(certs.key(Role::Agent)).unwrap();
    let err = Identity::from_cert_dir(&certs, Role::Agent)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&certs.key(Role::Agent).display().to_string()),
        "{err}"
    );
    assert!(err.contains("agora certs init"), "{err}");

    std::fs::write(certs.cert(Role::Client), b"not pem").unwrap();
    let err = Identity::from_cert_dir(&certs, Role::Client)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&certs.cert(Role::Client).display().to_string()),
        "{err}"
    );
}

#[test]
fn role_of_odd_certificates_is_none() {
    use rustls::pki_types::CertificateDer;
    assert_eq!(tls::role_of_cert(&CertificateDer::from(vec![])), None);
    assert_eq!(
        tls::role_of_cert(&CertificateDer::from(vec![0x30, 0x82, 0xff])),
        None
    );
    assert_eq!(
        tls::role_of_cert(&CertificateDer::from(vec![0u8; 64])),
        None
    );
    for role in Role::ALL {
        assert_eq!(Role::from_common_name(role.common_name()), Some(role));
    }
    assert_eq!(Role::from_common_name("agora-cluster-ca"), None);
}

#[test]
fn resolve_addresses() {
    assert_eq!(
        tls::resolve("127.0.0.1:5050").unwrap(),
        "127.0.0.1:5050".parse().unwrap()
    );
    assert_eq!(
        tls::resolve("[::1]:5050").unwrap(),
        "[::1]:5050".parse().unwrap()
    );
    assert_eq!(tls::resolve("localhost:5050").unwrap().port(), 5050);
    let err = tls::resolve("127.0.0.1").unwrap_err().to_string();
    assert!(err.contains("no port"), "{err}");
    let err = tls::resolve("localhost").unwrap_err().to_string();
    assert!(err.contains("no port"), "{err}");
    let err = tls::resolve("localhost:http").unwrap_err().to_string();
    assert!(err.contains("invalid port"), "{err}");
    let err = tls::resolve("").unwrap_err().to_string();
    assert!(err.contains("HOST:PORT"), "{err}");
    let err = tls::resolve("no-such-host.invalid:5050")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot resolve 'no-such-host.invalid:5050'"),
        "{err}"
    );
}

/// The agents' HTTPS certificate (`agent-http.pem`, on every agent that serves
/// `--http-tls`) is good for serving only: presented to the master's QUIC port as a
/// client certificate, it is refused, so it cannot stand for an agent or a client.
/// It names AGENT_HTTP_SERVER_NAME, loopback and the extra agent names.
#[tokio::test]
async fn the_agents_https_certificate_cannot_join_the_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tls::init_cert_dir_with(tmp.path(), &[], &["edge1.example".into()]).unwrap();
    assert_eq!(mode(&certs.agent_http_key()), 0o600);
    let der = cert_der(&certs.agent_http_cert());
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = sans_of(&cert);
    for name in [
        tls::AGENT_HTTP_SERVER_NAME,
        "localhost",
        "edge1.example",
        "[127, 0, 0, 1]",
    ] {
        assert!(sans.contains(name), "{name} missing from {sans}");
    }
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth, "{eku:?}");

    let mut master = start_master(&certs);
    let id = Identity::load(
        &certs.ca(),
        &certs.agent_http_cert(),
        &certs.agent_http_key(),
    )
    .unwrap();
    assert_eq!(id.role(), None, "its subject names no role");
    let ep = tls::client_endpoint(master.addr, &id).unwrap();
    let err = bounded("connect", tls::connect(&ep, master.addr))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused this client's certificate"), "{err}");
    let server_saw = bounded("server outcome", master.outcomes.recv())
        .await
        .unwrap();
    assert!(
        server_saw.is_err(),
        "master must not accept: {server_saw:?}"
    );
}
