//! Finds, in the running kernel, where the eBPF program must read: the fields of the
//! `sock:inet_sock_set_state` record (from its tracefs format file), the counters of
//! `struct tcp_sock` and the addresses, ports and state of its `struct sock_common` (from the
//! kernel's BTF, /sys/kernel/btf/vmlinux). Nothing is compiled in for one kernel; a counter the
//! kernel lacks reads as 0 and is reported.

use std::collections::HashMap;
use std::path::Path;

use flowattr_common::kernel::KernelLayout;

use crate::btf::Btf;

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
    #[error("the kernel's BTF has no member `{0}` where the exporter reads one")]
    MissingMember(&'static str),
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
    let not_understood = |error: crate::btf::BtfError| LayoutError::Btf {
        path: KERNEL_BTF.into(),
        reason: error.to_string(),
    };
    let btf = Btf::parse(btf).map_err(not_understood)?;
    let members_of = |name: &str| btf.struct_members(name).map_err(not_understood);
    let members = members_of("tcp_sock")?;
    // tcp_sock begins with inet_connection_sock, which begins with inet_sock, then sock, then
    // sock_common: each at offset 0 in every kernel so far, but summed rather than assumed.
    let mut sock_common = 0;
    for (outer, member) in [
        ("tcp_sock", "inet_conn"),
        ("inet_connection_sock", "icsk_inet"),
        ("inet_sock", "sk"),
        ("sock", "__sk_common"),
    ] {
        sock_common += *members_of(outer)?
            .get(member)
            .ok_or(LayoutError::MissingMember(member))?;
    }
    let common = members_of("sock_common")?;
    let common_field = |name: &'static str| {
        common
            .get(name)
            .map(|offset| sock_common + offset)
            .ok_or(LayoutError::MissingMember(name))
    };
    // A kernel built without IPv6 has no IPv6 sockets to check.
    let common_v6 = |name: &'static str| common_field(name).unwrap_or(KernelLayout::ABSENT);
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
        skc_daddr: common_field("skc_daddr")?,
        skc_rcv_saddr: common_field("skc_rcv_saddr")?,
        skc_dport: common_field("skc_dport")?,
        skc_num: common_field("skc_num")?,
        skc_family: common_field("skc_family")?,
        skc_state: common_field("skc_state")?,
        skc_v6_daddr: common_v6("skc_v6_daddr"),
        skc_v6_rcv_saddr: common_v6("skc_v6_rcv_saddr"),
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
        // struct sock_common, first in every socket, inside its anonymous unions: the layout
        // every x86-64 kernel since 4.x has (addresses, then hash, then ports, family, state).
        assert_eq!(
            (layout.skc_daddr, layout.skc_rcv_saddr, layout.skc_dport),
            (0, 4, 12)
        );
        assert_eq!(
            (layout.skc_num, layout.skc_family, layout.skc_state),
            (14, 16, 18)
        );
        assert!(layout.skc_v6_daddr < 128 && layout.skc_v6_rcv_saddr == layout.skc_v6_daddr + 16);
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
