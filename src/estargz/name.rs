//! Layer entry name normalisation, as Go's `path.Clean("/" + name)` does it
//! in the reference eStargz reader, shared by TOC and plain tar layers.

/// Maximum length of a file name component in Linux and ext4, in bytes.
pub const MAX_COMPONENT_LEN: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name {name:?} contains a NUL byte; file names cannot contain NUL")]
    Nul { name: String },

    #[error(
        "name {name:?} has a component of {len} bytes, over the limit of {max} bytes; \
         ext4 cannot store it"
    )]
    ComponentTooLong {
        name: String,
        len: usize,
        max: usize,
    },
}

/// Splits a layer entry name into its components below the root.
///
/// Leading `/` and `./` are dropped, `.` and empty components vanish and
/// `..` removes the previous component but never climbs above the root, so
/// `../../etc/passwd` names `etc/passwd`. An empty result is the root itself.
pub fn normalize_name(name: &[u8]) -> Result<Vec<Vec<u8>>, NameError> {
    if name.contains(&0) {
        return Err(NameError::Nul {
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }

    let mut components: Vec<Vec<u8>> = Vec::new();
    for component in name.split(|&byte| byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                components.pop();
            }
            _ => {
                if component.len() > MAX_COMPONENT_LEN {
                    return Err(NameError::ComponentTooLong {
                        name: String::from_utf8_lossy(name).into_owned(),
                        len: component.len(),
                        max: MAX_COMPONENT_LEN,
                    });
                }
                components.push(component.to_vec());
            }
        }
    }
    Ok(components)
}

/// Formats normalised components as an absolute path for messages and logs.
pub fn display_path(components: &[Vec<u8>]) -> String {
    let mut text = String::new();
    for component in components {
        text.push('/');
        text.push_str(&String::from_utf8_lossy(component));
    }
    if text.is_empty() {
        text.push('/');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|item| item.as_bytes().to_vec()).collect()
    }

    #[test]
    fn normalize_name_cases() {
        let long_ok = "a".repeat(255);
        type Case<'a> = (&'a str, &'a [u8], Vec<Vec<u8>>);
        let cases: Vec<Case> = vec![
            ("plain", b"etc/passwd", parts(&["etc", "passwd"])),
            (
                "dot slash prefix",
                b"./etc/passwd",
                parts(&["etc", "passwd"]),
            ),
            ("absolute", b"/etc/passwd", parts(&["etc", "passwd"])),
            ("trailing slash dir", b"bin/", parts(&["bin"])),
            ("dot slash root", b"./", parts(&[])),
            ("empty root", b"", parts(&[])),
            ("slash root", b"/", parts(&[])),
            ("dot root", b".", parts(&[])),
            ("double slash", b"a//b", parts(&["a", "b"])),
            ("inner dot", b"a/./b", parts(&["a", "b"])),
            ("dot dot inside", b"a/b/../c", parts(&["a", "c"])),
            (
                "dot dot above root",
                b"../../etc/passwd",
                parts(&["etc", "passwd"]),
            ),
            ("absolute dot dot", b"/../x", parts(&["x"])),
            (
                "dots in names kept",
                b"..dots../...",
                parts(&["..dots..", "..."]),
            ),
            ("whiteout kept", b"etc/.wh.old", parts(&["etc", ".wh.old"])),
            (
                "255 byte component",
                long_ok.as_bytes(),
                vec![long_ok.as_bytes().to_vec()],
            ),
        ];
        for (case, input, expected) in cases {
            assert_eq!(normalize_name(input), Ok(expected), "case {case}");
        }
    }

    #[test]
    fn normalize_name_rejects_long_component() {
        let name = format!("dir/{}", "x".repeat(256));
        let error = normalize_name(name.as_bytes()).unwrap_err();
        assert!(
            matches!(
                error,
                NameError::ComponentTooLong {
                    len: 256,
                    max: 255,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn normalize_name_rejects_nul() {
        let error = normalize_name(b"a\0b").unwrap_err();
        assert!(matches!(error, NameError::Nul { .. }), "{error}");
    }

    #[test]
    fn display_path_formats() {
        assert_eq!(display_path(&[]), "/");
        assert_eq!(display_path(&parts(&["a", "b"])), "/a/b");
    }
}
