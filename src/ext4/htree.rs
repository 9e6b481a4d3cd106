//! ext4 hash-indexed directories: half-MD4 name hash, dx_root and dx_node blocks (reference: kernel ext4 disk layout, "Hash Tree Directories", and fs/ext4/hash.c).
//!
//! Entries are sorted by (hash, minor hash, name) and packed greedily into
//! leaf blocks. When a leaf starts with the same hash its predecessor ends
//! with, the index entry for that leaf carries the low "continuation" bit,
//! so lookups go on into the next leaf. With more than 508
//! leaves a second index level (dx_node blocks of 511 entries) is added;
//! without the large_dir feature two levels are the maximum.

use super::directory::{write_dot_entries, write_leaf, DirEntry, Directory};
use super::disk::{put_u16, put_u32};
use super::BLOCK_SIZE;

const BLOCK: usize = BLOCK_SIZE as usize;
/// `dx_root_info.hash_version` for half-MD4. The superblock flag
/// `EXT2_FLAGS_UNSIGNED_HASH` makes readers use its unsigned-char variant.
pub(super) const DX_HASH_HALF_MD4: u8 = 1;
/// Entries in the dx_root: (4096 - 32 header bytes) / 8.
const ROOT_LIMIT: usize = (BLOCK - 32) / 8;
/// Entries in a dx_node: (4096 - 8 bytes of fake dirent) / 8.
const NODE_LIMIT: usize = (BLOCK - 8) / 8;
/// The hash the kernel reserves as end-of-directory marker (0x7fffffff << 1).
const EOF_HASH: u32 = 0x7fff_ffff << 1;

/// A directory needs more leaves than two index levels address.
#[derive(Debug)]
pub(super) struct TooManyLeaves {
    pub leaves: usize,
    pub max: usize,
}

/// One leaf block: its first entry and the hash its index entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Leaf {
    /// Index into `HtreeIndex::order` of the leaf's first entry.
    pub first: usize,
    /// Hash of the first entry, with bit 0 set when the previous leaf ends
    /// with the same hash. Not stored for leaf 0 (its lower bound is 0).
    pub hash: u32,
}

/// Block order: dx_root, then `nodes` dx_node blocks, then the leaves.
#[derive(Debug)]
pub(super) struct HtreeIndex {
    pub leaves: Vec<Leaf>,
    /// dx_node blocks; 0 when the root points at the leaves directly.
    pub nodes: usize,
    /// The directory's entries in hash order, as positions in its name-ordered
    /// list. Four bytes per entry, so the layout need not keep a copy of
    /// every name: it renders a leaf from the tree.
    pub order: Vec<u32>,
}

fn rotate_round(a: u32, f: u32, x: u32, shift: u32) -> u32 {
    a.wrapping_add(f).wrapping_add(x).rotate_left(shift)
}

/// Applies the half-MD4 transform of fs/ext4/hash.c (three MD4 rounds over eight words) to `buf`.
fn half_md4_transform(buf: &mut [u32; 4], input: &[u32; 8]) {
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let [mut a, mut b, mut c, mut d] = *buf;

    for &(i, s) in &[(0usize, 3u32), (4, 3)] {
        a = rotate_round(a, f(b, c, d), input[i], s);
        d = rotate_round(d, f(a, b, c), input[i + 1], 7);
        c = rotate_round(c, f(d, a, b), input[i + 2], 11);
        b = rotate_round(b, f(c, d, a), input[i + 3], 19);
    }
    for &(i, j, k, l) in &[(1usize, 3usize, 5usize, 7usize), (0, 2, 4, 6)] {
        a = rotate_round(a, g(b, c, d), input[i].wrapping_add(K2), 3);
        d = rotate_round(d, g(a, b, c), input[j].wrapping_add(K2), 5);
        c = rotate_round(c, g(d, a, b), input[k].wrapping_add(K2), 9);
        b = rotate_round(b, g(c, d, a), input[l].wrapping_add(K2), 13);
    }
    for &(i, j, k, l) in &[(3usize, 7usize, 2usize, 6usize), (1, 5, 0, 4)] {
        a = rotate_round(a, h(b, c, d), input[i].wrapping_add(K3), 3);
        d = rotate_round(d, h(a, b, c), input[j].wrapping_add(K3), 9);
        c = rotate_round(c, h(d, a, b), input[k].wrapping_add(K3), 11);
        b = rotate_round(b, h(c, d, a), input[l].wrapping_add(K3), 15);
    }

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// Packs up to 32 name bytes into eight words the way `str2hashbuf_unsigned` does.
fn name_to_words(name: &[u8], total_len: usize) -> [u32; 8] {
    let len_word = (total_len & 0xffff_ffff) as u32;
    let mut pad = len_word | (len_word << 8);
    pad |= pad << 16;

    let mut words = [pad; 8];
    let bytes = &name[..name.len().min(32)];
    let mut value = pad;
    let mut word = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        value = u32::from(byte).wrapping_add(value << 8);
        if i % 4 == 3 {
            words[word] = value;
            word += 1;
            value = pad;
        }
    }
    if word < 8 && bytes.len() % 4 != 0 {
        words[word] = value;
    }
    words
}

/// Computes the (major, minor) half-MD4 hash of a name with unsigned chars,
/// as the kernel does for `DX_HASH_HALF_MD4_UNSIGNED`.
pub(super) fn half_md4_hash(name: &[u8], seed: [u32; 4]) -> (u32, u32) {
    let mut buf = if seed.iter().any(|&word| word != 0) {
        seed
    } else {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    };
    let mut remaining = name;
    loop {
        let input = name_to_words(remaining, remaining.len());
        half_md4_transform(&mut buf, &input);
        if remaining.len() <= 32 {
            break;
        }
        remaining = &remaining[32..];
    }

    let mut hash = buf[1] & !1;
    if hash == EOF_HASH {
        hash = (0x7fff_ffff - 1) << 1;
    }
    (hash, buf[2])
}

/// Sorts `entries` (in name order) into hash order and packs them into
/// leaves; the entries themselves are not moved.
pub(super) fn plan(entries: &[DirEntry], seed: [u32; 4]) -> Result<HtreeIndex, TooManyLeaves> {
    let mut keyed: Vec<((u32, u32), u32)> = Vec::with_capacity(entries.len());
    for (position, entry) in entries.iter().enumerate() {
        // A leaf contains at least one entry, so past u32::MAX entries the leaf
        // count is far over the two-level maximum.
        let position = u32::try_from(position).map_err(|_| TooManyLeaves {
            leaves: entries.len(),
            max: ROOT_LIMIT * NODE_LIMIT,
        })?;
        keyed.push((half_md4_hash(&entry.name, seed), position));
    }
    let name = |position: u32| &entries[position as usize].name;
    keyed.sort_by(|(key_a, a), (key_b, b)| key_a.cmp(key_b).then_with(|| name(*a).cmp(name(*b))));

    let mut leaves = vec![Leaf { first: 0, hash: 0 }];
    let mut used = 0;
    for (position, &((hash, _), entry)) in keyed.iter().enumerate() {
        let rec_len = entries[entry as usize].rec_len();
        if used + rec_len > BLOCK {
            let previous_hash = keyed[position - 1].0 .0;
            let continuation = u32::from(previous_hash == hash);
            leaves.push(Leaf {
                first: position,
                hash: hash | continuation,
            });
            used = 0;
        }
        used += rec_len;
    }
    // Collected into a new vector: `collect` would keep the sort keys'
    // allocation, three times the size.
    let mut order = Vec::with_capacity(keyed.len());
    order.extend(keyed.iter().map(|&(_, entry)| entry));

    let nodes = if leaves.len() <= ROOT_LIMIT {
        0
    } else {
        leaves.len().div_ceil(NODE_LIMIT)
    };
    if nodes > ROOT_LIMIT {
        return Err(TooManyLeaves {
            leaves: leaves.len(),
            max: ROOT_LIMIT * NODE_LIMIT,
        });
    }
    Ok(HtreeIndex {
        leaves,
        nodes,
        order,
    })
}

impl HtreeIndex {
    pub fn blocks(&self) -> u64 {
        (1 + self.nodes + self.leaves.len()) as u64
    }

    /// Logical block of leaf `leaf`.
    fn leaf_block(&self, leaf: usize) -> u32 {
        u32::try_from(1 + self.nodes + leaf).unwrap_or(u32::MAX)
    }

    /// Writes index entries (count/limit header at `offset`, then one
    /// (hash, block) pair per entry; the first entry's hash slot holds the header).
    fn write_index(out: &mut [u8], offset: usize, limit: usize, entries: &[(u32, u32)]) {
        put_u16(out, offset, u16::try_from(limit).unwrap_or(u16::MAX));
        put_u16(
            out,
            offset + 2,
            u16::try_from(entries.len()).unwrap_or(u16::MAX),
        );
        for (slot, &(hash, block)) in entries.iter().enumerate() {
            let entry = offset + 8 * slot;
            if slot > 0 {
                put_u32(out, entry, hash);
            }
            put_u32(out, entry + 4, block);
        }
    }

    /// Renders logical block `logical` of `dir` into `out`. A leaf's entries
    /// come from `entries_at`, which returns the entries at the given
    /// positions of the directory's name-ordered list.
    pub fn write_block(
        &self,
        dir: &Directory,
        logical: u64,
        out: &mut [u8],
        entries_at: impl FnOnce(&[u32]) -> Vec<DirEntry>,
    ) {
        let Ok(logical) = usize::try_from(logical) else {
            return;
        };
        if logical == 0 {
            write_dot_entries(out, dir.inode, dir.parent, true);
            // dx_root_info: reserved_zero, hash_version, info_length, indirect_levels, unused_flags.
            put_u32(out, 24, 0);
            out[28] = DX_HASH_HALF_MD4;
            out[29] = 8;
            out[30] = u8::from(self.nodes > 0);
            out[31] = 0;
            let entries: Vec<(u32, u32)> = if self.nodes == 0 {
                (0..self.leaves.len())
                    .map(|leaf| (self.leaves[leaf].hash, self.leaf_block(leaf)))
                    .collect()
            } else {
                (0..self.nodes)
                    .map(|node| {
                        (
                            self.leaves[node * NODE_LIMIT].hash,
                            u32::try_from(1 + node).unwrap_or(u32::MAX),
                        )
                    })
                    .collect()
            };
            Self::write_index(out, 32, ROOT_LIMIT, &entries);
        } else if logical <= self.nodes {
            let node = logical - 1;
            let first = node * NODE_LIMIT;
            let end = (first + NODE_LIMIT).min(self.leaves.len());
            // A fake empty dirent spanning the block hides the index from linear readers.
            put_u32(out, 0, 0);
            put_u16(out, 4, u16::try_from(BLOCK).unwrap_or(u16::MAX));
            let entries: Vec<(u32, u32)> = (first..end)
                .map(|leaf| (self.leaves[leaf].hash, self.leaf_block(leaf)))
                .collect();
            Self::write_index(out, 8, NODE_LIMIT, &entries);
        } else {
            let leaf = logical - 1 - self.nodes;
            let Some(start) = self.leaves.get(leaf).map(|leaf| leaf.first) else {
                return;
            };
            let end = self
                .leaves
                .get(leaf + 1)
                .map_or(self.order.len(), |next| next.first);
            let Some(positions) = self.order.get(start..end) else {
                return;
            };
            write_leaf(out, &entries_at(positions));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext4::directory::FT_REG_FILE;

    fn entry(name: String) -> DirEntry {
        DirEntry {
            name: name.into_bytes().into(),
            inode: 12,
            file_type: FT_REG_FILE,
        }
    }

    #[test]
    fn hash_is_even_and_seed_dependent() {
        let (plain, _) = half_md4_hash(b"file_00001", [0; 4]);
        let (seeded, _) = half_md4_hash(b"file_00001", [1, 2, 3, 4]);
        assert_eq!(plain & 1, 0);
        assert_ne!(plain, seeded);
    }

    #[test]
    fn name_words_pad_with_length() {
        let words = name_to_words(b"abcde", 5);
        let pad = 0x0505_0505;
        assert_eq!(words[0], 0x6162_6364);
        assert_eq!(words[1], (pad << 8) | 0x65);
        assert_eq!(words[2], pad);
    }

    #[test]
    fn plan_sorts_by_hash_and_marks_collisions() {
        let entries: Vec<DirEntry> = (0..3000).map(|i| entry(format!("entry-{i:05}"))).collect();
        let index = plan(&entries, [0; 4]).unwrap();
        assert!(index.leaves.len() > 1);
        let mut order = index.order.clone();
        order.sort_unstable();
        assert_eq!(order, (0..3000).collect::<Vec<u32>>(), "every entry once");
        let hashes: Vec<u32> = index
            .order
            .iter()
            .map(|&position| half_md4_hash(&entries[position as usize].name, [0; 4]).0)
            .collect();
        assert!(hashes.windows(2).all(|pair| pair[0] <= pair[1]));
        for leaf in &index.leaves[1..] {
            let first = hashes[leaf.first];
            let continues = hashes[leaf.first - 1] == first;
            assert_eq!(leaf.hash, first | u32::from(continues));
        }
    }

    #[test]
    fn plan_adds_node_level_past_root_limit() {
        let long = "n".repeat(200);
        let entries: Vec<DirEntry> = (0..12000).map(|i| entry(format!("{long}{i}"))).collect();
        let index = plan(&entries, [0; 4]).unwrap();
        assert!(index.leaves.len() > ROOT_LIMIT);
        assert_eq!(index.nodes, index.leaves.len().div_ceil(NODE_LIMIT));
    }
}
