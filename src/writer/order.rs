//! Entry order of an eStargz layer: prioritized files first, with their
//! parent directories and hard link targets, then the landmark, then the
//! rest in input order.

use std::collections::HashMap;

use super::entry::{clean_name, EntryType, SourceEntry};

/// The layer's entries in output order.
pub struct Ordered {
    pub entries: Vec<SourceEntry>,
    /// Number of leading entries that were prioritized (the landmark goes
    /// after them); 0 means `.no.prefetch.landmark` goes first.
    pub prioritized_count: usize,
    pub missed: Vec<String>,
}

/// Orders `entries` for the prioritized paths.
pub fn order_entries(entries: Vec<SourceEntry>, prioritized: &[String]) -> Ordered {
    let by_name: HashMap<Vec<u8>, usize> = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| (clean_name(&entry.meta.name), index))
        .collect();
    let mut taken = vec![false; entries.len()];
    let mut order: Vec<usize> = Vec::new();
    let mut missed = Vec::new();

    for path in prioritized {
        let clean = clean_name(path.as_bytes());
        match by_name.get(&clean) {
            Some(&index) => {
                take_with_dependencies(index, &entries, &by_name, &mut taken, &mut order, 0)
            }
            None => missed.push(path.clone()),
        }
    }
    let prioritized_count = order.len();
    order.extend((0..entries.len()).filter(|&index| !taken[index]));

    let mut slots: Vec<Option<SourceEntry>> = entries.into_iter().map(Some).collect();
    let entries = order
        .into_iter()
        .filter_map(|index| slots[index].take())
        .collect();
    Ordered {
        entries,
        prioritized_count,
        missed,
    }
}

/// Largest chain of hard links followed when pulling targets forward; a
/// longer chain is a cycle in a corrupt tar.
const MAX_LINK_DEPTH: usize = 16;

fn take_with_dependencies(
    index: usize,
    entries: &[SourceEntry],
    by_name: &HashMap<Vec<u8>, usize>,
    taken: &mut [bool],
    order: &mut Vec<usize>,
    depth: usize,
) {
    if taken[index] || depth > MAX_LINK_DEPTH {
        return;
    }
    let meta = &entries[index].meta;
    let clean = clean_name(&meta.name);

    // Parent directories that the input lists come before their children.
    let mut prefix_end = 0;
    while let Some(position) = clean[prefix_end..].iter().position(|&byte| byte == b'/') {
        let parent = &clean[..prefix_end + position];
        if let Some(&parent_index) = by_name.get(parent) {
            if !taken[parent_index] && parent_index != index {
                taken[parent_index] = true;
                order.push(parent_index);
            }
        }
        prefix_end += position + 1;
    }
    if meta.kind == EntryType::Hardlink {
        if let Some(&target) = by_name.get(&clean_name(&meta.link_name)) {
            if target != index {
                take_with_dependencies(target, entries, by_name, taken, order, depth + 1);
            }
        }
    }
    if !taken[index] {
        taken[index] = true;
        order.push(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::entry::{Content, EntryMeta};

    fn entry(name: &str, kind: EntryType, link: &str) -> SourceEntry {
        let mut meta = EntryMeta::regular(name, 0);
        meta.kind = kind;
        meta.link_name = link.as_bytes().to_vec();
        SourceEntry {
            meta,
            content: Content::None,
        }
    }

    fn names(ordered: &Ordered) -> Vec<String> {
        ordered
            .entries
            .iter()
            .map(|entry| entry.meta.display_name())
            .collect()
    }

    #[test]
    fn prioritized_order_table() {
        let input = || {
            vec![
                entry("bin/", EntryType::Dir, ""),
                entry("bin/a", EntryType::Reg, ""),
                entry("lib/", EntryType::Dir, ""),
                entry("lib/x", EntryType::Reg, ""),
                entry("lib/sub/", EntryType::Dir, ""),
                entry("lib/sub/y", EntryType::Hardlink, "bin/a"),
                entry("z", EntryType::Reg, ""),
            ]
        };
        struct Case {
            name: &'static str,
            prioritized: &'static [&'static str],
            expected: &'static [&'static str],
            count: usize,
            missed: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "none",
                prioritized: &[],
                expected: &[
                    "bin/",
                    "bin/a",
                    "lib/",
                    "lib/x",
                    "lib/sub/",
                    "lib/sub/y",
                    "z",
                ],
                count: 0,
                missed: &[],
            },
            Case {
                name: "file_with_parent",
                prioritized: &["lib/x"],
                expected: &[
                    "lib/",
                    "lib/x",
                    "bin/",
                    "bin/a",
                    "lib/sub/",
                    "lib/sub/y",
                    "z",
                ],
                count: 2,
                missed: &[],
            },
            Case {
                name: "hardlink_pulls_target",
                prioritized: &["./lib/sub/y", "z"],
                expected: &[
                    "lib/",
                    "lib/sub/",
                    "bin/",
                    "bin/a",
                    "lib/sub/y",
                    "z",
                    "lib/x",
                ],
                count: 6,
                missed: &[],
            },
            Case {
                name: "missing_path",
                prioritized: &["nope", "z"],
                expected: &[
                    "z",
                    "bin/",
                    "bin/a",
                    "lib/",
                    "lib/x",
                    "lib/sub/",
                    "lib/sub/y",
                ],
                count: 1,
                missed: &["nope"],
            },
        ];
        for case in cases {
            let prioritized: Vec<String> = case.prioritized.iter().map(|s| s.to_string()).collect();
            let ordered = order_entries(input(), &prioritized);
            assert_eq!(names(&ordered), case.expected, "case {}", case.name);
            assert_eq!(ordered.prioritized_count, case.count, "case {}", case.name);
            assert_eq!(ordered.missed, case.missed, "case {}", case.name);
        }
    }
}
