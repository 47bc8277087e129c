//! What the exporter needs of the kernel's BTF (`/sys/kernel/btf/vmlinux`): the byte offsets of
//! a struct's members. Only that much of the format is read: the header, the type section
//! walked kind by kind, and the string section.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BtfError(String);

const BTF_MAGIC: u16 = 0xEB9F;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One type of the type section: its header, and where its members (if any) start.
#[derive(Clone, Copy)]
struct Type {
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    members_at: usize,
}

/// A parsed BTF blob.
pub struct Btf<'a> {
    bytes: &'a [u8],
    strings: &'a [u8],
    /// Type id `n` is `types[n - 1]` (id 0 is void).
    types: Vec<Type>,
}

impl<'a> Btf<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        let mut btf = Btf {
            bytes,
            strings: &[],
            types: Vec::new(),
        };
        if btf.u16_at(0)? != BTF_MAGIC {
            return Err(BtfError("bad magic (not little-endian BTF)".into()));
        }
        let header_len = btf.u32_at(4)? as usize;
        let type_off = btf.u32_at(8)? as usize;
        let type_len = btf.u32_at(12)? as usize;
        let str_off = btf.u32_at(16)? as usize;
        let str_len = btf.u32_at(20)? as usize;
        btf.strings = bytes
            .get(header_len + str_off..header_len + str_off + str_len)
            .ok_or_else(|| BtfError("string section out of range".into()))?;
        let end = header_len + type_off + type_len;
        let mut at = header_len + type_off;
        while at + 12 <= end {
            let name = btf.u32_at(at)?;
            let info = btf.u32_at(at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
                other => return Err(BtfError(format!("unknown type kind {other}"))),
            };
            btf.types.push(Type {
                name,
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                members_at: at,
            });
            at += extra;
        }
        Ok(btf)
    }

    /// Byte offsets of the members of `struct name`, those of its anonymous structs and unions
    /// (`union { __addrpair skc_addrpair; struct { __be32 skc_daddr; ... }; }`) included.
    /// Bitfields are left out: nothing the program reads is one.
    pub fn struct_members(&self, name: &str) -> Result<HashMap<String, u32>, BtfError> {
        let found = self
            .types
            .iter()
            .find(|found| found.kind == KIND_STRUCT && self.string(found.name) == name)
            .ok_or_else(|| BtfError(format!("no `struct {name}`")))?;
        let mut members = HashMap::new();
        self.add_members(*found, 0, &mut members, 0)?;
        Ok(members)
    }

    fn add_members(
        &self,
        composite: Type,
        base: u32,
        members: &mut HashMap<String, u32>,
        depth: usize,
    ) -> Result<(), BtfError> {
        // Anonymous members nest a few levels in practice; a cycle would be damaged BTF.
        if depth > 8 {
            return Err(BtfError("anonymous members nested too deep".into()));
        }
        for member in 0..composite.vlen {
            let at = composite.members_at + 12 * member;
            let name = self.string(self.u32_at(at)?);
            let type_id = self.u32_at(at + 4)? as usize;
            let offset = self.u32_at(at + 8)?;
            // With kind_flag the low 24 bits are the bit offset and the top 8 a bitfield size.
            let bits = if composite.kind_flag {
                if offset >> 24 != 0 {
                    continue;
                }
                offset & 0xff_ffff
            } else {
                offset
            };
            if bits % 8 != 0 {
                continue;
            }
            let offset = base + bits / 8;
            if !name.is_empty() {
                members.insert(name.to_owned(), offset);
                continue;
            }
            let nested = type_id
                .checked_sub(1)
                .and_then(|index| self.types.get(index))
                .filter(|nested| matches!(nested.kind, KIND_STRUCT | KIND_UNION));
            if let Some(nested) = nested {
                self.add_members(*nested, offset, members, depth + 1)?;
            }
        }
        Ok(())
    }

    fn string(&self, offset: u32) -> &str {
        self.strings
            .get(offset as usize..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .unwrap_or_default()
    }

    fn u16_at(&self, at: usize) -> Result<u16, BtfError> {
        let bytes = self.bytes.get(at..at + 2).ok_or_else(truncated)?;
        Ok(u16::from_le_bytes(bytes.try_into().expect("2 bytes")))
    }

    fn u32_at(&self, at: usize) -> Result<u32, BtfError> {
        let bytes = self.bytes.get(at..at + 4).ok_or_else(truncated)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }
}

fn truncated() -> BtfError {
    BtfError("truncated".into())
}
