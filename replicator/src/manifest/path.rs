//! Relative paths inside a volume, as bytes, validated once at the edge.
//!
//! A [`RelPath`] is how every layer names an entry: `/`-separated components relative to the
//! volume root, the empty path being the root itself. It is the only way a path from a manifest
//! (possibly a peer's) reaches the filesystem code, so its constructor rejects everything that
//! could escape the volume: absolute paths, `.` and `..`, empty components, NUL bytes, and
//! oversized names. File names are bytes, not UTF-8: spaces, newlines and invalid UTF-8 are fine.

use std::cmp::Ordering;
use std::fmt;

/// Longest path (in bytes) a manifest may carry.
pub const MAX_PATH: usize = 4096;
/// Longest single component (Linux `NAME_MAX`).
pub const MAX_NAME: usize = 255;

#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct RelPath(Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsafe path {path:?}: {why}")]
pub struct PathError {
    pub path: String,
    pub why: &'static str,
}

impl RelPath {
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Validates `bytes` as a path relative to the volume root.
    pub fn new(bytes: Vec<u8>) -> Result<Self, PathError> {
        let fail = |why| {
            Err(PathError {
                path: String::from_utf8_lossy(&bytes).into_owned(),
                why,
            })
        };
        if bytes.is_empty() {
            return Ok(RelPath(bytes));
        }
        if bytes.len() > MAX_PATH {
            return fail("longer than 4096 bytes");
        }
        if bytes[0] == b'/' {
            return fail("absolute");
        }
        if bytes.contains(&0) {
            return fail("contains NUL");
        }
        for comp in bytes.split(|&b| b == b'/') {
            match comp {
                b"" => return fail("empty component"),
                b"." | b".." => return fail("dot component"),
                c if c.len() > MAX_NAME => return fail("component longer than 255 bytes"),
                _ => {}
            }
        }
        Ok(RelPath(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The child `name` of this path; `name` must be a valid single component.
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        if name.contains(&b'/') || name.is_empty() {
            return Err(PathError {
                path: String::from_utf8_lossy(name).into_owned(),
                why: "not a single component",
            });
        }
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        RelPath::new(v)
    }

    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// Parent path and last component; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((RelPath(self.0[..i].to_vec()), &self.0[i + 1..])),
            None => Some((RelPath::root(), &self.0[..])),
        }
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }
}

/// Volume order: component by component, each compared as bytes. This is the order of a
/// depth-first walk that visits a directory before its children and children sorted by name,
/// which is the order of every manifest.
impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> Ordering {
        let key = |b: &u8| if *b == b'/' { 0 } else { *b };
        self.0.iter().map(key).cmp(other.0.iter().map(key))
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&String::from_utf8_lossy(&self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes() {
        for bad in [
            &b"/etc/passwd"[..],
            b"a/../b",
            b"..",
            b"a//b",
            b"a/",
            b"./a",
            b"a\0b",
        ] {
            assert!(RelPath::new(bad.to_vec()).is_err(), "{bad:?} accepted");
        }
        assert!(RelPath::new(vec![b'x'; 256]).is_err());
    }

    #[test]
    fn accepts_odd_but_valid_names() {
        for ok in [&b"a b/c\nd"[..], b"\xff\xfe", b"...", b".hidden/x"] {
            assert!(RelPath::new(ok.to_vec()).is_ok());
        }
    }

    #[test]
    fn order_is_depth_first() {
        let p = |s: &str| RelPath::new(s.as_bytes().to_vec()).unwrap();
        let mut v = vec![p("a.b"), p("a/z"), p("a"), p("b"), p("a/b/c"), p("")];
        v.sort();
        assert_eq!(
            v,
            vec![p(""), p("a"), p("a/b/c"), p("a/z"), p("a.b"), p("b")]
        );
    }

    #[test]
    fn split_and_join() {
        let p = RelPath::new(b"x/y/z".to_vec()).unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(parent.as_bytes(), b"x/y");
        assert_eq!(name, b"z");
        assert_eq!(parent.join(b"z").unwrap(), p);
        assert!(p.starts_with(&parent));
        assert!(!RelPath::new(b"x/yy".to_vec()).unwrap().starts_with(&parent));
    }
}
