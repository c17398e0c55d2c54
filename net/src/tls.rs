//! QUIC/TLS plumbing shared by every Agora process: the cluster CA and role certificates
//! (`init_cert_dir`), loading an identity, QUIC endpoints with mutual TLS 1.3 (ring
//! provider only), connecting to a master with errors a user can act on, and the role of
//! the peer of a connection.
//!
//! Trust model: one CA per cluster. Every process presents a certificate signed by it and
//! trusts only it. Clients verify the master against [`MASTER_SERVER_NAME`] whatever address
//! they dial, so a master may be reached through any address or name. The role of a peer
//! (master, agent, client) is the subject CN of its certificate.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportErrorCode};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Every master certificate carries this DNS name; clients always verify the master against it, whatever address they dial.
pub const MASTER_SERVER_NAME: &str = "agora-master";
/// Every certificate of an agent's HTTPS function door (`agent-http.pem`) carries this
/// DNS name; the masters' gateways verify agents' doors against it, whatever address
/// an agent advertises. Its subject CN names no role, and it is good for serving only
/// (server auth), so it cannot stand for a peer on the QUIC port.
pub const AGENT_HTTP_SERVER_NAME: &str = "agora-agent-http";
/// The ALPN protocol of HTTPS doors (HTTP/1.1 only).
pub const HTTP_ALPN: &[u8] = b"http/1.1";
/// The one ALPN protocol both sides offer.
pub const ALPN: &[u8] = b"agora/1";

/// How long `connect` waits for a master to answer and accept our certificate.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC keep-alive interval on every connection (shorter than the idle timeout).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// QUIC idle timeout on every connection.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bidirectional streams a peer may have open at once, until the server has seen
/// its certificate's role and set that role's own limit (see `streams_for`).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Bytes a peer may have sent on one connection that the application has not read
/// yet, over all its streams: bounds what 1,000 silent or slow streams can make us
/// buffer (quinn's default is unbounded).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;

/// Validity of the certificates `init_cert_dir` makes (10 years).
const CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600 + 3 * 24 * 3600);
/// Certificates start being valid a little in the past, to tolerate clock skew.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
const CA_COMMON_NAME: &str = "agora-cluster-ca";
const CERTS_HINT: &str = "create certificates with `agora certs init DIR`";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Master,
    Agent,
    Client,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Master, Role::Agent, Role::Client];

    /// The subject CN of this role's certificates: "agora-master", "agora-agent", "agora-client".
    pub fn common_name(self) -> &'static str {
        match self {
            Role::Master => "agora-master",
            Role::Agent => "agora-agent",
            Role::Client => "agora-client",
        }
    }

    /// The role whose certificates carry this subject CN.
    pub fn from_common_name(cn: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.common_name() == cn)
    }

    /// File stem of this role's certificate and key in a [`CertDir`].
    fn file_stem(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_stem())
    }
}

/// Paths of the files `init_cert_dir` writes in DIR: ca.pem ca.key master.pem master.key agent.pem agent.key client.pem client.key agent-http.pem agent-http.key
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> CertDir {
        CertDir { dir: dir.into() }
    }

    /// The cluster CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The cluster CA private key (only `init_cert_dir` needs it).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    pub fn cert(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}.pem", role.file_stem()))
    }

    pub fn key(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}.key", role.file_stem()))
    }

    /// The certificate of agents' HTTPS function doors (`agora agent --http-tls`).
    pub fn agent_http_cert(&self) -> PathBuf {
        self.dir.join("agent-http.pem")
    }

    /// The private key of [`CertDir::agent_http_cert`].
    pub fn agent_http_key(&self) -> PathBuf {
        self.dir.join("agent-http.key")
    }
}

/// Creates DIR (mode 0700) with a new cluster CA and one certificate+key for each role signed by it.
/// If DIR already has ca.pem/ca.key, reuses that CA and only writes missing role certificates (so it is safe to run twice).
/// The master certificate's SANs: MASTER_SERVER_NAME, "localhost", 127.0.0.1, ::1 plus `extra_master_names` (DNS names or IPs).
/// Certificates name their role in the subject CN: "agora-master", "agora-agent", "agora-client". Key files mode 0600. Validity 10 years.
/// Also writes the agents' HTTPS door certificate (see [`init_cert_dir_with`]) with no extra names.
pub fn init_cert_dir(dir: &Path, extra_master_names: &[String]) -> Result<CertDir> {
    init_cert_dir_with(dir, extra_master_names, &[])
}

/// [`init_cert_dir`], and `agent-http.pem`/`agent-http.key` when missing: the
/// certificate agents serve their function door with under `--http-tls` (server auth
/// only; SANs [`AGENT_HTTP_SERVER_NAME`], "localhost", 127.0.0.1, ::1 plus
/// `extra_agent_names`, the names or IPs clients reach agents by).
pub fn init_cert_dir_with(
    dir: &Path,
    extra_master_names: &[String],
    extra_agent_names: &[String],
) -> Result<CertDir> {
    let cd = CertDir::new(dir);
    create_private_dir(dir)?;

    let (ca_pem, ca_key) = match (cd.ca().exists(), cd.ca_key().exists()) {
        (true, true) => load_ca(&cd)?,
        (false, false) => {
            let key =
                KeyPair::generate().map_err(|e| Error::tls("cannot generate the CA key", e))?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            // Each cluster's CA gets its own name: a verifier that meets a certificate of
            // another cluster then reports "unknown issuer", not a confusing bad signature.
            let id = &agora_proto::sha256_hex(key.public_key_raw())[..12];
            params
                .distinguished_name
                .push(DnType::CommonName, format!("{CA_COMMON_NAME} {id}"));
            params
                .distinguished_name
                .push(DnType::OrganizationName, "Agora");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            set_validity(&mut params);
            let cert = params
                .self_signed(&key)
                .map_err(|e| Error::tls("cannot make the CA certificate", e))?;
            write_file(&cd.ca_key(), key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&cd.ca(), cert.pem().as_bytes(), 0o644)?;
            (cert.pem(), key)
        }
        (true, false) => {
            return Err(Error::Certificates(format!(
                "{} exists but {} does not: cannot sign certificates without the CA key; \
                 restore it, or use an empty directory for a new cluster CA",
                cd.ca().display(),
                cd.ca_key().display()
            )))
        }
        (false, true) => {
            return Err(Error::Certificates(format!(
                "{} exists but {} does not: restore the CA certificate, or use an empty \
                 directory for a new cluster CA",
                cd.ca_key().display(),
                cd.ca().display()
            )))
        }
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| {
        Error::tls(
            format!("{} is not a usable CA certificate", cd.ca().display()),
            e,
        )
    })?;

    for role in Role::ALL {
        if cd.cert(role).exists() && cd.key(role).exists() {
            continue;
        }
        let mut params = leaf_params(role.common_name());
        match role {
            Role::Master => {
                params.subject_alt_names = sans(MASTER_SERVER_NAME, extra_master_names, "master")?;
                // A master also acts as a client of other masters (high availability).
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Role::Agent => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Role::Client => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                params.subject_alt_names = vec![principal_san(ADMIN_PRINCIPAL)?];
            }
        }
        issue(
            &params,
            &issuer,
            &cd.cert(role),
            &cd.key(role),
            &format!("the {role}"),
        )?;
    }
    if !(cd.agent_http_cert().exists() && cd.agent_http_key().exists()) {
        let mut params = leaf_params(AGENT_HTTP_SERVER_NAME);
        params.subject_alt_names = sans(AGENT_HTTP_SERVER_NAME, extra_agent_names, "agent")?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        issue(
            &params,
            &issuer,
            &cd.agent_http_cert(),
            &cd.agent_http_key(),
            "the agents' HTTPS",
        )?;
    }
    Ok(cd)
}

/// The subject alternative names `fixed`, "localhost", 127.0.0.1, ::1, then each of
/// `extra` not already there; `whose` names them in an error ("master", "agent").
fn sans(fixed: &str, extra: &[String], whose: &str) -> Result<Vec<rcgen::SanType>> {
    let mut names: Vec<String> = vec![
        fixed.into(),
        "localhost".into(),
        Ipv4Addr::LOCALHOST.to_string(),
        Ipv6Addr::LOCALHOST.to_string(),
    ];
    for n in extra {
        let n = n.trim();
        if !n.is_empty() && !names.iter().any(|m| m == n) {
            names.push(n.to_string());
        }
    }
    CertificateParams::new(names.clone())
        .map(|p| p.subject_alt_names)
        .map_err(|e| {
            Error::tls(
                format!("invalid {whose} name among {names:?}: expected DNS names or IP addresses"),
                e,
            )
        })
}

/// A new key, and `params` signed by the CA into `cert` (0644) and `key` (0600);
/// `what` names the certificate in an error.
fn issue(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
    cert: &Path,
    key: &Path,
    what: &str,
) -> Result<()> {
    let pair = KeyPair::generate().map_err(|e| Error::tls("cannot generate a key", e))?;
    let signed = params
        .signed_by(&pair, issuer)
        .map_err(|e| Error::tls(format!("cannot sign {what} certificate"), e))?;
    write_file(key, pair.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert, signed.pem().as_bytes(), 0o644)
}

/// A certificate the cluster CA signs for `common_name`: not a CA, signing only,
/// with the CA's key identifier and the usual validity.
fn leaf_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Agora");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    params
}

fn set_validity(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + CERT_VALIDITY).into();
}

fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .map_err(|e| Error::file(format!("cannot create directory {}", parent.display()), e))?;
    }
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| Error::file(format!("cannot create directory {}", dir.display()), e))?;
    set_mode(dir, 0o700)
}

#[allow(unused_variables)]
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::file(format!("cannot set the mode of {}", path.display()), e))?;
    }
    Ok(())
}

/// Writes a file through a temporary sibling and a rename, so a reader never sees half of it
/// and a private key is never readable by others, even for a moment.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let result = (|| -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::file(format!("cannot write {}", path.display()), e));
    }
    set_mode(&tmp, mode)?;
    fs::rename(&tmp, path).map_err(|e| Error::file(format!("cannot write {}", path.display()), e))
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Certificates(format!(
                "{what} file {} does not exist: {CERTS_HINT}",
                path.display()
            ))
        } else {
            Error::Certificates(format!(
                "cannot read {what} file {}: {e} ({CERTS_HINT})",
                path.display()
            ))
        }
    })
}

/// The CA certificate (PEM) and key of `cd`, checked to belong together.
fn load_ca(cd: &CertDir) -> Result<(String, KeyPair)> {
    let ca_pem = read_to_string(&cd.ca(), "CA certificate")?;
    let key_pem = read_to_string(&cd.ca_key(), "CA key")?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| {
        Error::tls(
            format!("{} is not a PEM private key", cd.ca_key().display()),
            e,
        )
    })?;
    check_ca_matches_key(&cd.ca(), &ca_pem, &cd.ca_key(), &key)?;
    Ok((ca_pem, key))
}

fn read_to_string(path: &Path, what: &str) -> Result<String> {
    String::from_utf8(read_file(path, what)?).map_err(|_| {
        Error::Certificates(format!(
            "{what} file {} is not PEM text: {CERTS_HINT}",
            path.display()
        ))
    })
}

/// Refuses a ca.pem/ca.key pair that do not belong together: certificates signed with the
/// wrong key would be refused by every peer, far from the cause.
fn check_ca_matches_key(
    ca_path: &Path,
    ca_pem: &str,
    key_path: &Path,
    key: &KeyPair,
) -> Result<()> {
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| {
        Error::Certificates(format!("{} has no PEM certificate: {e}", ca_path.display()))
    })?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
        Error::Certificates(format!(
            "{} is not a valid X.509 certificate: {e}",
            ca_path.display()
        ))
    })?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::Certificates(format!(
            "{} is not the key of the CA certificate {}: restore the matching pair, \
             or use an empty directory for a new cluster CA",
            key_path.display(),
            ca_path.display()
        )));
    }
    Ok(())
}

/// A loaded identity: CA certificate(s) to trust, our certificate chain and private key.
pub struct Identity {
    roots: Arc<RootCertStore>,
    /// sha256 (hex) of the cluster CA certificate(s) this identity trusts.
    cluster: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            roots: self.roots.clone(),
            cluster: self.cluster.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Errors name the file that is missing or unreadable and suggest `agora certs init DIR`.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Identity> {
        let roots = load_roots(ca)?;
        let cluster = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for c in load_certs(ca, "CA certificate")? {
                h.update(c.as_ref());
            }
            hex::encode(h.finalize())
        };
        let chain = load_certs(cert, "certificate")?;
        let key = load_key(key, "private key")?;
        Ok(Identity {
            roots: Arc::new(roots),
            cluster,
            chain,
            key,
        })
    }

    pub fn from_cert_dir(dir: &CertDir, role: Role) -> Result<Identity> {
        Identity::load(&dir.ca(), &dir.cert(role), &dir.key(role))
    }

    /// Names the cluster this identity belongs to: the sha256 (hex) of its CA
    /// certificate. Masters write it into their Raft log, so a data dir of another
    /// cluster is refused.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The role our own certificate names, if any.
    pub fn role(&self) -> Option<Role> {
        self.chain.first().and_then(|c| role_of_cert(c))
    }
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::Certificates(format!(
                "{what} file {} is not valid PEM ({e}): {CERTS_HINT}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::Certificates(format!(
            "{what} file {} holds no PEM certificate: {CERTS_HINT}",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>> {
    let bytes = read_file(path, what)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        Error::Certificates(format!(
            "private key file {} holds no usable PEM private key ({e}): {CERTS_HINT}",
            path.display()
        ))
    })
}

fn load_roots(ca: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca, "CA certificate")? {
        roots.add(c).map_err(|e| {
            Error::Certificates(format!(
                "CA certificate file {} holds an unusable certificate ({e}): {CERTS_HINT}",
                ca.display()
            ))
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    #[allow(clippy::expect_used, reason = "a constant well under quinn's limit")]
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(MAX_IDLE_TIMEOUT).expect("15 s is a valid idle timeout"),
    ));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_CONCURRENT_STREAMS));
    // Nothing uses unidirectional streams.
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.receive_window(quinn::VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    Arc::new(t)
}

/// QUIC server endpoint (used by the master) bound to `bind` (port 0 allowed; read the port back with endpoint.local_addr()).
/// Requires a client certificate signed by the CA (mutual TLS, TLS 1.3 only, ALPN agora/1).
/// Must be called inside a tokio runtime.
pub fn server_endpoint(bind: SocketAddr, id: &Identity) -> Result<quinn::Endpoint> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::tls("cannot build the client certificate verifier", e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::tls("TLS 1.3 is unavailable", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| {
            Error::tls(
                "the certificate and private key do not form a usable pair",
                e,
            )
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No session resumption: every connection presents (and has checked) a certificate.
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|e| Error::tls("TLS configuration unusable for QUIC", e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config());
    quinn::Endpoint::server(config, bind)
        .map_err(|e| Error::file(format!("cannot listen on {bind} (UDP)"), e))
}

/// QUIC client endpoint bound to an ephemeral port of the right address family for `for_addr`, presenting `id`'s certificate
/// and trusting only `id`'s CA. Must be called inside a tokio runtime.
pub fn client_endpoint(for_addr: SocketAddr, id: &Identity) -> Result<quinn::Endpoint> {
    client_endpoint_with(for_addr, http_client_config(id)?)
}

/// A client endpoint that trusts the CA in `ca` but presents no certificate at all. Masters
/// refuse it; it exists to test (and show) that refusal.
pub fn client_endpoint_without_identity(
    for_addr: SocketAddr,
    ca: &Path,
) -> Result<quinn::Endpoint> {
    let tls = client_tls_builder(Arc::new(load_roots(ca)?))?.with_no_client_auth();
    client_endpoint_with(for_addr, tls)
}

fn client_tls_builder(
    roots: Arc<RootCertStore>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::tls("TLS 1.3 is unavailable", e))?
        .with_root_certificates(roots))
}

fn client_endpoint_with(
    for_addr: SocketAddr,
    mut tls: rustls::ClientConfig,
) -> Result<quinn::Endpoint> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| Error::tls("TLS configuration unusable for QUIC", e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    let bind: SocketAddr = match for_addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| Error::file(format!("cannot open a UDP socket on {bind}"), e))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// The TLS settings of an agent's HTTPS function door (`--http-tls`): TLS 1.3, ALPN
/// http/1.1, the certificate chain in `cert` with the key in `key` (by default a
/// cert dir's `agent-http.pem`/`agent-http.key`). With `client_ca`, clients must
/// present a certificate that CA signed (the masters' gateways present their
/// cluster's client certificate); without, any client may connect.
/// Errors name the file and what to do.
pub fn http_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>> {
    let chain = load_certs(cert, "HTTPS certificate")?;
    let key_der = load_key(key, "HTTPS private key")?;
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::tls("TLS 1.3 is unavailable", e))?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| Error::tls("cannot build the client certificate verifier", e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(chain, key_der).map_err(|e| {
        Error::tls(
            format!(
                "{} and {} do not form a usable certificate and key pair",
                cert.display(),
                key.display()
            ),
            e,
        )
    })?;
    tls.alpn_protocols = vec![HTTP_ALPN.to_vec()];
    Ok(Arc::new(tls))
}

/// The TLS settings of a client that trusts only `id`'s cluster CA and presents
/// `id`'s certificate, TLS 1.3, no ALPN: the QUIC client endpoints' (which add
/// theirs), and those of the masters' gateways as clients of agents' HTTPS function
/// doors (verify the server as [`AGENT_HTTP_SERVER_NAME`]; the HTTP client sets its
/// ALPN).
pub fn http_client_config(id: &Identity) -> Result<rustls::ClientConfig> {
    client_tls_builder(id.roots.clone())?
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| {
            Error::tls(
                "the certificate and private key do not form a usable pair",
                e,
            )
        })
}

/// Connects to a master at `addr` (server name MASTER_SERVER_NAME) with a bounded timeout (10 s),
/// and does not return Ok until the server has accepted our certificate. Errors are sentences a user can act on.
pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection> {
    connect_within(endpoint, addr, CONNECT_TIMEOUT).await
}

/// [`connect`] with another time bound.
///
/// In TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate, so quinn hands us a "connected" connection that the server may close a moment
/// later with a TLS alert. We therefore wait until the server confirms the handshake (its
/// HANDSHAKE_DONE frame, which it sends only once it has accepted our certificate) or closes
/// the connection. quinn has no event for HANDSHAKE_DONE, so we watch the connection's frame
/// statistics, racing that against the connection being closed.
pub async fn connect_within(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quinn::Connection> {
    let connecting = endpoint
        .connect(addr, MASTER_SERVER_NAME)
        .map_err(|e| Error::Connect(format!("cannot connect to the master at {addr}: {e}")))?;
    let attempt = async {
        let conn = connecting.await?;
        wait_handshake_confirmed(&conn).await?;
        Ok::<_, ConnectionError>(conn)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(explain_connect_error(addr, timeout, e)),
        Err(_) => Err(no_answer(addr, timeout)),
    }
}

async fn wait_handshake_confirmed(conn: &quinn::Connection) -> Result<(), ConnectionError> {
    let closed = conn.closed();
    tokio::pin!(closed);
    let mut pause = Duration::from_millis(1);
    loop {
        if conn.stats().frame_rx.handshake_done > 0 {
            return Ok(());
        }
        tokio::select! {
            e = &mut closed => return Err(e),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn no_answer(addr: SocketAddr, timeout: Duration) -> Error {
    Error::NoAnswer { addr, timeout }
}

/// TLS alert codes (RFC 8446 section 6) that mean "your certificate is not acceptable".
fn is_certificate_alert(alert: u8) -> bool {
    matches!(alert, 42..=46 | 48 | 49 | 116)
}

fn alert_name(alert: u8) -> &'static str {
    match alert {
        10 => "unexpected message",
        20 => "bad record mac",
        40 => "handshake failure",
        42 => "bad certificate",
        43 => "unsupported certificate",
        44 => "certificate revoked",
        45 => "certificate expired",
        46 => "certificate unknown",
        47 => "illegal parameter",
        48 => "unknown CA",
        49 => "access denied",
        50 => "decode error",
        51 => "decrypt error",
        70 => "protocol version",
        71 => "insufficient security",
        80 => "internal error",
        109 => "missing extension",
        110 => "unsupported extension",
        112 => "unrecognized name",
        116 => "certificate required",
        120 => "no application protocol",
        _ => "TLS alert",
    }
}

/// The TLS alert carried by a QUIC error code, if it is a crypto error.
fn tls_alert(code: TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..0x200)
        .contains(&code)
        .then_some((code & 0xff) as u8)
}

fn describe(alert: u8, reason: &str) -> String {
    let name = alert_name(alert);
    if reason.is_empty() {
        format!("TLS alert {alert}: {name}")
    } else {
        format!("{reason}; TLS alert {alert}: {name}")
    }
}

fn explain_connect_error(addr: SocketAddr, timeout: Duration, e: ConnectionError) -> Error {
    let connect = Error::Connect;
    match e {
        // Our own TLS stack gave up: the master's certificate is the usual reason.
        ConnectionError::TransportError(te) => match tls_alert(te.code) {
            Some(alert) if is_certificate_alert(alert) || te.reason.contains("certificate") => {
                connect(format!(
                "the master at {addr} presented a certificate this client does not trust ({}): \
                 the master and this client must use certificates from the same cluster CA, \
                 see `agora certs init`",
                describe(alert, &te.reason)
            ))
            }
            Some(120) => connect(format!(
                "the server at {addr} does not speak {} ({}): is it an Agora master?",
                String::from_utf8_lossy(ALPN),
                describe(120, &te.reason)
            )),
            Some(alert) => connect(format!(
                "the TLS handshake with the master at {addr} failed ({})",
                describe(alert, &te.reason)
            )),
            None => connect(format!(
                "the connection to the master at {addr} failed: {te}"
            )),
        },
        // The master's TLS stack closed the connection.
        ConnectionError::ConnectionClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            match tls_alert(close.error_code) {
                Some(alert) if is_certificate_alert(alert) || reason.contains("certificate") => {
                    connect(format!(
                        "the master at {addr} refused this client's certificate ({}): \
                     use certificates from this cluster's CA, see `agora certs init`",
                        describe(alert, &reason)
                    ))
                }
                Some(120) => connect(format!(
                    "the server at {addr} does not speak {} ({}): is it an Agora master?",
                    String::from_utf8_lossy(ALPN),
                    describe(120, &reason)
                )),
                Some(alert) => connect(format!(
                    "the master at {addr} ended the TLS handshake ({})",
                    describe(alert, &reason)
                )),
                None => connect(format!(
                    "the master at {addr} aborted the connection: {close}"
                )),
            }
        }
        ConnectionError::ApplicationClosed(close) => connect(format!(
            "the master at {addr} closed the connection: {close}"
        )),
        ConnectionError::TimedOut => no_answer(addr, timeout),
        ConnectionError::Reset => connect(format!(
            "the master at {addr} reset the connection (did it just restart?): try again"
        )),
        ConnectionError::VersionMismatch => connect(format!(
            "the server at {addr} speaks no QUIC version we support: is it an Agora master?"
        )),
        e @ (ConnectionError::LocallyClosed | ConnectionError::CidsExhausted) => connect(format!(
            "the connection to the master at {addr} failed: {e}"
        )),
    }
}

/// Role of the peer of an established connection, from its certificate's subject CN. None if it has none / unknown.
pub fn peer_role(conn: &quinn::Connection) -> Option<Role> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    role_of_cert(chain.first()?)
}

/// The role a certificate names in its subject CN, if any. Never panics on odd input.
pub fn role_of_cert(cert: &CertificateDer<'_>) -> Option<Role> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut cns = parsed.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?;
    // A certificate naming two CNs is ambiguous: trust neither.
    if cns.next().is_some() {
        return None;
    }
    Role::from_common_name(cn)
}

/// The principal of the client certificate `agora certs init` writes (client.pem).
pub const ADMIN_PRINCIPAL: &str = "admin";
/// A client certificate names its principal in a URI subject alternative name
/// `agora-principal:NAME`.
const PRINCIPAL_URI: &str = "agora-principal:";
/// Longest principal name.
pub const MAX_PRINCIPAL_LEN: usize = 128;

/// Whether `name` can be a principal: 1 to 128 letters, digits, `.`, `_`, `-`, `@`,
/// not starting with `.` (names become directory names: never `.` or `..`).
pub fn check_principal(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_PRINCIPAL_LEN
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    {
        return Err(format!(
            "principal {name:?} must be 1 to {MAX_PRINCIPAL_LEN} letters, digits, '.', '_', '-' or '@', not starting with '.'"
        ));
    }
    Ok(())
}

/// Longest validity `issue_client_cert` gives (the CA's own: ten years).
pub const MAX_CLIENT_VALIDITY: Duration = CERT_VALIDITY;

fn principal_san(name: &str) -> Result<rcgen::SanType> {
    check_principal(name).map_err(Error::Certificates)?;
    let uri = rcgen::string::Ia5String::try_from(format!("{PRINCIPAL_URI}{name}"))
        .map_err(|e| Error::tls(format!("principal {name:?}"), e))?;
    Ok(rcgen::SanType::URI(uri))
}

/// The principal a certificate names (its one `agora-principal:` URI), if any. A
/// certificate naming two, or a malformed one, names none. Never panics.
pub fn principal_of_cert(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut found = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(PRINCIPAL_URI),
        _ => None,
    });
    let name = found.next()?;
    if found.next().is_some() || check_principal(name).is_err() {
        return None;
    }
    Some(name.to_string())
}

/// The principal of the peer of an established connection; empty when its
/// certificate names none.
pub fn peer_principal(conn: &quinn::Connection) -> String {
    let Some(identity) = conn.peer_identity() else {
        return String::new();
    };
    identity
        .downcast_ref::<Vec<CertificateDer<'static>>>()
        .and_then(|chain| chain.first())
        .and_then(principal_of_cert)
        .unwrap_or_default()
}

/// Signs a client certificate for `principal` with the CA of `ca_dir` into
/// `out/client.pem` and `out/client.key` (0600), copying the CA certificate to
/// `out/ca.pem`; valid for `validity` from now (at most the CA's ten years).
pub fn issue_client_cert(
    ca_dir: &Path,
    principal: &str,
    out: &Path,
    validity: Duration,
) -> Result<CertDir> {
    let cd = CertDir::new(ca_dir);
    let (ca_pem, key) = load_ca(&cd)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| {
        Error::tls(
            format!("{} is not a usable CA certificate", cd.ca().display()),
            e,
        )
    })?;
    let mut params = leaf_params(Role::Client.common_name());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![principal_san(principal)?];
    let now = SystemTime::now();
    if validity > CERT_VALIDITY {
        return Err(Error::Certificates(format!(
            "a client certificate is valid for at most {} days, like the cluster's other certificates",
            CERT_VALIDITY.as_secs() / 86_400
        )));
    }
    params.not_after = (now + validity).into();
    create_private_dir(out)?;
    let out_cd = CertDir::new(out);
    write_file(&out_cd.ca(), ca_pem.as_bytes(), 0o644)?;
    issue(
        &params,
        &issuer,
        &out_cd.cert(Role::Client),
        &out_cd.key(Role::Client),
        &format!("principal {principal}'s"),
    )?;
    Ok(out_cd)
}

/// Resolves "host:port" (or an IP:port) to a SocketAddr with a clear error.
/// When a name resolves to both families, IPv4 is preferred (masters usually bind 0.0.0.0).
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    let addr = addr.trim();
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let hint = "expected HOST:PORT, e.g. 127.0.0.1:5050, [::1]:5050 or master.example.com:5050";
    if addr.is_empty() {
        return Err(Error::Address(format!("empty address: {hint}")));
    }
    if addr.parse::<IpAddr>().is_ok() {
        return Err(Error::Address(format!(
            "address '{addr}' has no port: {hint}"
        )));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(Error::Address(format!(
            "address '{addr}' has no port: {hint}"
        )));
    };
    if host.is_empty() {
        return Err(Error::Address(format!(
            "address '{addr}' has no host: {hint}"
        )));
    }
    if port.parse::<u16>().is_err() {
        return Err(Error::Address(format!(
            "address '{addr}' has an invalid port '{port}': {hint}"
        )));
    }
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Error::Address(format!("cannot resolve '{addr}': {e} ({hint})")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| Error::Address(format!("'{host}' resolves to no address")))
}
