//! Finds, in the running kernel, where the eBPF program must read: the fields of the
//! `sock:inet_sock_set_state` record (from its tracefs format file) and the counters of
//! `struct tcp_sock` (from the kernel's BTF, /sys/kernel/btf/vmlinux). Nothing is compiled in
//! for one kernel; a counter the kernel lacks reads as 0 and is reported.

use std::collections::HashMap;
use std::path::Path;

use flowattr_common::kernel::KernelLayout;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "this kernel has no BTF at {path} ({source}); flowattr-exporter finds struct offsets in \
         it, so it needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's \
         kernel since 2020)"
    )]
    NoKernelBtf {
        path: String,
        source: std::io::Error,
    },
    #[error("the tracepoint format has no field `{0}`")]
    MissingField(&'static str),
    #[error("{path} is not BTF this exporter understands: {reason}")]
    Btf { path: String, reason: String },
    #[error("the kernel's BTF has no `struct tcp_sock`")]
    NoTcpSock,
}

pub const TRACEPOINT_FORMAT: &str = "/sys/kernel/tracing/events/sock/inet_sock_set_state/format";
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The tcp_sock counters the program reads, and which were found.
#[derive(Debug, Clone)]
pub struct Discovered {
    pub layout: KernelLayout,
    /// Counters the kernel's tcp_sock lacks (read as 0).
    pub missing_counters: Vec<&'static str>,
}

pub fn discover() -> Result<Discovered, LayoutError> {
    discover_at(TRACEPOINT_FORMAT, KERNEL_BTF)
}

fn discover_at(format: &str, btf_path: &str) -> Result<Discovered, LayoutError> {
    // BTF first: without it nothing else matters, and it needs no mounted tracefs.
    let btf = std::fs::read(btf_path).map_err(|source| LayoutError::NoKernelBtf {
        path: btf_path.into(),
        source,
    })?;
    let format = read_text(format)?;
    discover_from(&format, &btf)
}

fn read_text(path: &str) -> Result<String, LayoutError> {
    std::fs::read_to_string(Path::new(path)).map_err(|source| LayoutError::Read {
        path: path.into(),
        source,
    })
}

pub fn discover_from(format: &str, btf: &[u8]) -> Result<Discovered, LayoutError> {
    let fields = tracepoint_fields(format);
    let field = |name: &'static str| {
        fields
            .get(name)
            .copied()
            .ok_or(LayoutError::MissingField(name))
    };
    let members = struct_members(btf, "tcp_sock")?;
    let mut missing_counters = Vec::new();
    let mut counter = |name: &'static str| match members.get(name) {
        Some(&offset) => offset,
        None => {
            missing_counters.push(name);
            KernelLayout::ABSENT
        }
    };
    let layout = KernelLayout {
        skaddr: field("skaddr")?,
        oldstate: field("oldstate")?,
        newstate: field("newstate")?,
        sport: field("sport")?,
        dport: field("dport")?,
        family: field("family")?,
        protocol: field("protocol")?,
        saddr: field("saddr")?,
        daddr: field("daddr")?,
        saddr_v6: field("saddr_v6")?,
        daddr_v6: field("daddr_v6")?,
        bytes_acked: counter("bytes_acked"),
        bytes_received: counter("bytes_received"),
        segs_in: counter("segs_in"),
        segs_out: counter("segs_out"),
        total_retrans: counter("total_retrans"),
        srtt_us: counter("srtt_us"),
        mdev_us: counter("mdev_us"),
    };
    Ok(Discovered {
        layout,
        missing_counters,
    })
}

/// `field:__u16 sport; offset:24; size:2; signed:0;` (tab-separated) -> ("sport", 24).
fn tracepoint_fields(format: &str) -> HashMap<String, u32> {
    let mut fields = HashMap::new();
    for line in format.lines() {
        let Some(declaration) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let mut parts = declaration.split(';');
        let Some(declaration) = parts.next() else {
            continue;
        };
        let name = declaration
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .split('[')
            .next()
            .unwrap_or_default()
            .trim_start_matches('*');
        let offset = parts
            .find_map(|part| part.trim().strip_prefix("offset:"))
            .and_then(|offset| offset.parse().ok());
        if let Some(offset) = offset {
            fields.insert(name.to_owned(), offset);
        }
    }
    fields
}

const BTF_MAGIC: u16 = 0xEB9F;
const KIND_STRUCT: u32 = 4;

/// Byte offsets of the direct members of `struct name` in a raw BTF blob. Only what this needs
/// of the format: the header, the type section walked kind by kind, and the string section.
fn struct_members(btf: &[u8], name: &str) -> Result<HashMap<String, u32>, LayoutError> {
    let bad = |reason: &str| LayoutError::Btf {
        path: KERNEL_BTF.into(),
        reason: reason.into(),
    };
    let u16_at = |at: usize| -> Result<u16, LayoutError> {
        Ok(u16::from_le_bytes(
            btf.get(at..at + 2)
                .ok_or_else(|| bad("truncated"))?
                .try_into()
                .expect("2 bytes"),
        ))
    };
    let u32_at = |at: usize| -> Result<u32, LayoutError> {
        Ok(u32::from_le_bytes(
            btf.get(at..at + 4)
                .ok_or_else(|| bad("truncated"))?
                .try_into()
                .expect("4 bytes"),
        ))
    };
    if u16_at(0)? != BTF_MAGIC {
        return Err(bad("bad magic (not little-endian BTF)"));
    }
    let header_len = u32_at(4)? as usize;
    let type_off = u32_at(8)? as usize;
    let type_len = u32_at(12)? as usize;
    let str_off = u32_at(16)? as usize;
    let str_len = u32_at(20)? as usize;
    let types = header_len + type_off..header_len + type_off + type_len;
    let strings = btf
        .get(header_len + str_off..header_len + str_off + str_len)
        .ok_or_else(|| bad("string section out of range"))?;
    let string = |offset: u32| -> &str {
        strings
            .get(offset as usize..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .unwrap_or_default()
    };
    let mut at = types.start;
    while at + 12 <= types.end {
        let name_off = u32_at(at)?;
        let info = u32_at(at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
            other => return Err(bad(&format!("unknown type kind {other}"))),
        };
        if kind == KIND_STRUCT && string(name_off) == name {
            let mut members = HashMap::new();
            for member in 0..vlen {
                let base = at + 12 * member;
                let member_name = string(u32_at(base)?);
                let offset = u32_at(base + 8)?;
                // With kind_flag the low 24 bits are the bit offset and the top 8 a bitfield
                // size; counters are never bitfields, so a bitfield member is skipped.
                let bits = if kind_flag {
                    if offset >> 24 != 0 {
                        continue;
                    }
                    offset & 0xff_ffff
                } else {
                    offset
                };
                if bits % 8 == 0 && !member_name.is_empty() {
                    members.insert(member_name.to_owned(), bits / 8);
                }
            }
            return Ok(members);
        }
        at += extra;
    }
    Err(LayoutError::NoTcpSock)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;

	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;
";

    #[test]
    fn tracepoint_format_fields_parse() {
        let fields = tracepoint_fields(FORMAT);
        assert_eq!(fields["skaddr"], 8);
        assert_eq!(fields["saddr_v6"], 40);
        assert_eq!(fields["protocol"], 30);
    }

    #[test]
    fn this_kernel_has_a_layout() {
        // Every CI and dev machine runs Linux with BTF (the exporter needs it), as root.
        crate::ensure_kernel_filesystems().expect("tracefs mounted");
        let discovered = discover().expect("the running kernel's layout");
        let layout = discovered.layout;
        assert_eq!(layout.newstate, 20);
        assert!(
            discovered.missing_counters.is_empty(),
            "{:?}",
            discovered.missing_counters
        );
        // tcp_sock embeds inet_connection_sock, which embeds struct sock: its counters lie
        // well past the start, in distinct places.
        let counters = [
            layout.bytes_acked,
            layout.bytes_received,
            layout.segs_in,
            layout.segs_out,
            layout.total_retrans,
            layout.srtt_us,
            layout.mdev_us,
        ];
        assert!(
            counters.iter().all(|&offset| offset > 512 && offset < 8192),
            "{counters:?}"
        );
        let mut unique = counters.to_vec();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), counters.len());
    }

    #[test]
    fn a_kernel_without_btf_is_named_as_such() {
        let error = discover_at(TRACEPOINT_FORMAT, "/sys/kernel/btf/no-such-kernel").unwrap_err();
        assert!(matches!(error, LayoutError::NoKernelBtf { .. }));
        assert!(
            error.to_string().contains("CONFIG_DEBUG_INFO_BTF"),
            "{error}"
        );
    }

    #[test]
    fn garbage_btf_is_an_error() {
        assert!(matches!(
            discover_from(FORMAT, b"nope"),
            Err(LayoutError::Btf { .. })
        ));
        assert!(matches!(
            discover_from("", &[]),
            Err(LayoutError::MissingField(_)) | Err(LayoutError::Btf { .. })
        ));
    }
}
