//! Error text shared by every module.

/// An error and its causes on one line (`outer: inner: root`), each cause once:
/// reqwest and hyper often repeat their cause in their own message.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}
