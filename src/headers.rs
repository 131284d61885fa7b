//! Read access to a request's headers, whatever carries them: the receiver's
//! HTTP requests, or a list of pairs (imports, `hookbox send`, tests).

/// A request's headers, looked up by name.
pub trait HeaderLookup {
    /// Every value of the header `name` (case-insensitive), in order.
    fn values(&self, name: &str) -> Vec<&[u8]>;
}

impl HeaderLookup for [(&str, &str)] {
    fn values(&self, name: &str) -> Vec<&[u8]> {
        self.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes())
            .collect()
    }
}

impl HeaderLookup for actix_web::http::header::HeaderMap {
    fn values(&self, name: &str) -> Vec<&[u8]> {
        self.get_all(name).map(|value| value.as_bytes()).collect()
    }
}
