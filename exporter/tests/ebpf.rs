//! The eBPF program for real: load it into this kernel, attach it to the tracepoint and watch it
//! count loopback TCP connections. Needs root (CI runs as root); it fails, never skips, without.

use std::net::{TcpListener, TcpStream};

use aya::maps::PerCpuArray;
use aya::programs::TracePoint;
use flowattr_exporter::{EBPF_OBJECT, TRACEPOINT, ensure_kernel_filesystems};

const TCP_ESTABLISHED: u32 = 1;
const CONNECTIONS: u64 = 20;

fn established_count(ebpf: &aya::Ebpf) -> u64 {
    let map = ebpf.map("TCP_STATE_TRANSITIONS").expect("map exists");
    let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(map).expect("per-CPU array");
    counts
        .get(&TCP_ESTABLISHED, 0)
        .expect("slot 1")
        .iter()
        .sum()
}

#[test]
fn program_loads_attaches_and_sees_loopback_connections() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the eBPF tests need root");
    ensure_kernel_filesystems().expect("tracefs and bpffs");
    let mut ebpf = aya::Ebpf::load(EBPF_OBJECT).expect("the embedded object loads");
    let program: &mut TracePoint = ebpf
        .program_mut(TRACEPOINT.1)
        .expect("program present")
        .try_into()
        .expect("a tracepoint program");
    program.load().expect("the verifier accepts the program");
    program.attach(TRACEPOINT.0, TRACEPOINT.1).expect("attach");

    let before = established_count(&ebpf);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    for _ in 0..CONNECTIONS {
        let client = TcpStream::connect(address).unwrap();
        let (server, _) = listener.accept().unwrap();
        drop((client, server));
    }
    let seen = established_count(&ebpf) - before;
    // Each connection reaches ESTABLISHED on both ends; other traffic can only add.
    assert!(
        seen >= 2 * CONNECTIONS,
        "saw {seen} transitions to ESTABLISHED for {CONNECTIONS} connections"
    );
}
