//! The two guest styles: how each is linked, checked, instantiated per request and
//! turned into an HTTP response.

pub(crate) mod cgi_module;
pub(crate) mod http_component;
