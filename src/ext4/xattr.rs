//! ext4 extended attributes in the inode body and in one external xattr block (reference: kernel ext4 disk layout, "Extended Attributes", and fs/ext4/xattr.c).
//!
//! Names are stored with their namespace prefix replaced by a name index.
//! POSIX ACLs arrive in the generic `system.posix_acl_*` xattr format
//! (version 2, 8-byte entries) and are converted to ext4's compact on-disk
//! ACL format (version 1, 4-byte entries for the owner, group, mask and
//! other entries). Entries are sorted by (index, name length, name), the
//! order the kernel's sorted lookup in xattr blocks relies on, and placed
//! first-fit into the inode body, the rest into the block.

use std::borrow::Cow;

use super::disk::{align4, put_u16, put_u32};
use super::BLOCK_SIZE;

/// Magic of the in-inode xattr area and of the xattr block header.
pub(super) const XATTR_MAGIC: u32 = 0xea02_0000;
/// Offset of the in-inode xattr area: 128-byte base inode + 32 extra bytes.
pub(super) const IBODY_OFFSET: usize = 160;
/// End of the in-inode xattr area (the inode size).
pub(super) const IBODY_END: usize = 256;
/// Bytes available for entries, terminator and values in the inode body
/// (after the 4-byte magic).
const IBODY_SPACE: usize = IBODY_END - IBODY_OFFSET - 4;
/// Size of the xattr block header (`ext4_xattr_header`).
const BLOCK_HEADER: usize = 32;
const BLOCK_SPACE: usize = BLOCK_SIZE as usize - BLOCK_HEADER;
/// Size of the four zero bytes that end an entry list.
const TERMINATOR: usize = 4;

const ACL_XATTR_VERSION: u32 = 2;
const EXT4_ACL_VERSION: u32 = 1;
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// Name prefixes and their `e_name_index`; an exact full name (the ACLs)
/// leaves an empty suffix.
const NAME_INDEXES: &[(&[u8], u8)] = &[
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
];

/// Reasons an xattr cannot be stored.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum XattrProblem {
    /// The namespace has no ext4 name index this layout supports.
    UnsupportedNamespace,
    /// The name without prefix is empty or longer than 255 bytes.
    InvalidNameLength(usize),
    /// A POSIX ACL value that is not in the xattr ACL format.
    MalformedAcl(&'static str),
    /// The value alone is larger than an xattr block can hold.
    ValueTooLarge(usize),
}

impl std::fmt::Display for XattrProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XattrProblem::UnsupportedNamespace => write!(
                f,
                "namespace is not one of user., trusted., security., system.posix_acl_access, system.posix_acl_default"
            ),
            XattrProblem::InvalidNameLength(len) => {
                write!(f, "name without prefix is {len} bytes; ext4 allows 1 to 255")
            }
            XattrProblem::MalformedAcl(reason) => write!(f, "invalid POSIX ACL value: {reason}"),
            XattrProblem::ValueTooLarge(len) => {
                write!(f, "value is {len} bytes; one xattr block holds at most {}", BLOCK_SPACE - 20)
            }
        }
    }
}

/// One xattr in on-disk form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Xattr<'a> {
    pub index: u8,
    pub name: &'a [u8],
    pub value: Cow<'a, [u8]>,
}

impl Xattr<'_> {
    /// Size of the `ext4_xattr_entry` with its name, 4-aligned.
    fn entry_size(&self) -> usize {
        align4(16 + self.name.len())
    }

    /// Entry, its share of the list and its value, all 4-aligned.
    fn footprint(&self) -> usize {
        self.entry_size() + align4(self.value.len())
    }

    /// `e_hash` as `ext4_xattr_hash_entry` computes it: the name bytes, then
    /// the value as zero-padded little-endian words.
    fn hash(&self) -> u32 {
        let mut hash: u32 = 0;
        for &byte in self.name {
            hash = (hash << 5) ^ (hash >> 27) ^ u32::from(byte);
        }
        for chunk in self.value.chunks(4) {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(word);
        }
        hash
    }
}

/// Converts a `system.posix_acl_*` value to the ext4 on-disk ACL format.
fn convert_acl(value: &[u8]) -> Result<Vec<u8>, XattrProblem> {
    if value.len() < 4 || (value.len() - 4) % 8 != 0 {
        return Err(XattrProblem::MalformedAcl("length is not 4 + 8 * entries"));
    }
    let version = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
    if version != ACL_XATTR_VERSION {
        return Err(XattrProblem::MalformedAcl("header version is not 2"));
    }

    let mut out = EXT4_ACL_VERSION.to_le_bytes().to_vec();
    for entry in value[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        match tag {
            ACL_USER_OBJ | ACL_GROUP_OBJ | ACL_MASK | ACL_OTHER => {
                out.extend_from_slice(&entry[..4])
            }
            ACL_USER | ACL_GROUP => out.extend_from_slice(entry),
            _ => return Err(XattrProblem::MalformedAcl("unknown entry tag")),
        }
    }
    Ok(out)
}

/// Converts one full-name xattr to its on-disk form.
pub(super) fn encode<'a>(name: &'a [u8], value: &'a [u8]) -> Result<Xattr<'a>, XattrProblem> {
    let Some(&(prefix, index)) = NAME_INDEXES
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
    else {
        return Err(XattrProblem::UnsupportedNamespace);
    };
    let suffix = &name[prefix.len()..];

    let is_acl = index == 2 || index == 3;
    if is_acl && !suffix.is_empty() {
        return Err(XattrProblem::UnsupportedNamespace);
    }
    if !is_acl && (suffix.is_empty() || suffix.len() > 255) {
        return Err(XattrProblem::InvalidNameLength(suffix.len()));
    }

    let value = if is_acl {
        Cow::Owned(convert_acl(value)?)
    } else {
        Cow::Borrowed(value)
    };
    let xattr = Xattr {
        index,
        name: suffix,
        value,
    };
    if xattr.footprint() + TERMINATOR > BLOCK_SPACE {
        return Err(XattrProblem::ValueTooLarge(xattr.value.len()));
    }
    Ok(xattr)
}

/// Xattrs split between the inode body and the external block.
#[derive(Debug, Default)]
pub(super) struct Placement<'a> {
    pub ibody: Vec<Xattr<'a>>,
    pub block: Vec<Xattr<'a>>,
}

/// Places encoded xattrs: first-fit into the inode body, the rest into
/// the block. Returns `Err((needed, available))` when the block overflows.
pub(super) fn place(mut xattrs: Vec<Xattr<'_>>) -> Result<Placement<'_>, (usize, usize)> {
    xattrs.sort_by(|a, b| (a.index, a.name.len(), a.name).cmp(&(b.index, b.name.len(), b.name)));

    let mut placement = Placement::default();
    let mut ibody_used = TERMINATOR;
    let mut block_used = TERMINATOR;
    for xattr in xattrs {
        if ibody_used + xattr.footprint() <= IBODY_SPACE {
            ibody_used += xattr.footprint();
            placement.ibody.push(xattr);
        } else {
            block_used += xattr.footprint();
            placement.block.push(xattr);
        }
    }
    if block_used > BLOCK_SPACE {
        return Err((ibody_used + block_used, IBODY_SPACE + BLOCK_SPACE));
    }
    Ok(placement)
}

/// Writes entries at `entries_at` and values downward from `values_end`;
/// value offsets are relative to `base`. Returns the entry hashes.
fn write_list(
    out: &mut [u8],
    base: usize,
    entries_at: usize,
    values_end: usize,
    xattrs: &[Xattr<'_>],
) -> Vec<u32> {
    let mut entry = entries_at;
    let mut value_at = values_end;
    let mut hashes = Vec::with_capacity(xattrs.len());
    for xattr in xattrs {
        value_at -= align4(xattr.value.len());
        out[value_at..value_at + xattr.value.len()].copy_from_slice(&xattr.value);
        let value_offs = if xattr.value.is_empty() {
            0
        } else {
            value_at - base
        };
        let hash = xattr.hash();

        out[entry] = u8::try_from(xattr.name.len()).unwrap_or(u8::MAX);
        out[entry + 1] = xattr.index;
        put_u16(
            out,
            entry + 2,
            u16::try_from(value_offs).unwrap_or(u16::MAX),
        );
        put_u32(out, entry + 4, 0);
        put_u32(
            out,
            entry + 8,
            u32::try_from(xattr.value.len()).unwrap_or(u32::MAX),
        );
        put_u32(out, entry + 12, hash);
        out[entry + 16..entry + 16 + xattr.name.len()].copy_from_slice(xattr.name);

        hashes.push(hash);
        entry += xattr.entry_size();
    }
    hashes
}

/// Writes the in-inode xattr area into a 256-byte inode.
pub(super) fn write_ibody(inode: &mut [u8], xattrs: &[Xattr<'_>]) {
    if xattrs.is_empty() {
        return;
    }
    put_u32(inode, IBODY_OFFSET, XATTR_MAGIC);
    let first_entry = IBODY_OFFSET + 4;
    write_list(inode, first_entry, first_entry, IBODY_END, xattrs);
}

/// Writes an external xattr block referenced by one inode.
pub(super) fn write_block(out: &mut [u8], xattrs: &[Xattr<'_>]) {
    put_u32(out, 0, XATTR_MAGIC);
    put_u32(out, 4, 1); // h_refcount
    put_u32(out, 8, 1); // h_blocks
    let hashes = write_list(out, 0, BLOCK_HEADER, out.len(), xattrs);

    // h_hash as ext4_xattr_rehash computes it; a zero entry hash zeroes it.
    let mut block_hash: u32 = 0;
    for hash in hashes {
        if hash == 0 {
            block_hash = 0;
            break;
        }
        block_hash = (block_hash << 16) ^ (block_hash >> 16) ^ hash;
    }
    put_u32(out, 12, block_hash);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_name_indexes() {
        type Expected = Result<(u8, &'static [u8]), XattrProblem>;
        let cases: &[(&[u8], Expected)] = &[
            (b"user.comment", Ok((1, b"comment"))),
            (b"trusted.overlay.opaque", Ok((4, b"overlay.opaque"))),
            (b"security.capability", Ok((6, b"capability"))),
            (b"security.selinux", Ok((6, b"selinux"))),
            (b"user.", Err(XattrProblem::InvalidNameLength(0))),
            (b"os2.foo", Err(XattrProblem::UnsupportedNamespace)),
            (
                b"system.posix_acl_accessx",
                Err(XattrProblem::UnsupportedNamespace),
            ),
        ];
        for (name, expected) in cases {
            let got = encode(name, b"v").map(|x| (x.index, x.name));
            assert_eq!(&got, expected, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn acl_converts_to_ext4_format() {
        let mut value = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 6, u32::MAX),
            (0x20, 4, u32::MAX),
        ] {
            value.extend_from_slice(&tag.to_le_bytes());
            value.extend_from_slice(&perm.to_le_bytes());
            value.extend_from_slice(&id.to_le_bytes());
        }
        let xattr = encode(b"system.posix_acl_access", &value).unwrap();
        assert_eq!(xattr.index, 2);
        assert_eq!(xattr.value.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert_eq!(&xattr.value[..4], &1u32.to_le_bytes());
        assert_eq!(&xattr.value[8..16], &[2, 0, 4, 0, 0xe8, 0x03, 0, 0]);
    }

    #[test]
    fn acl_rejects_bad_version() {
        let value = [1u8, 0, 0, 0];
        assert!(matches!(
            encode(b"system.posix_acl_default", &value),
            Err(XattrProblem::MalformedAcl(_))
        ));
    }

    #[test]
    fn place_spills_to_block() {
        let big = vec![7u8; 1000];
        let xattrs = vec![
            encode(b"security.capability", &[1u8; 20]).unwrap(),
            encode(b"user.big", &big).unwrap(),
            encode(b"user.small", b"x").unwrap(),
        ];
        let placement = place(xattrs).unwrap();
        let ibody: Vec<&[u8]> = placement.ibody.iter().map(|x| x.name).collect();
        let block: Vec<&[u8]> = placement.block.iter().map(|x| x.name).collect();
        assert_eq!(ibody, vec![&b"small"[..], &b"capability"[..]]);
        assert_eq!(block, vec![&b"big"[..]]);
    }

    #[test]
    fn place_rejects_overflow() {
        let big = vec![7u8; 3000];
        let xattrs = vec![
            encode(b"user.a", &big).unwrap(),
            encode(b"user.b", &big).unwrap(),
        ];
        assert!(place(xattrs).is_err());
    }
}
