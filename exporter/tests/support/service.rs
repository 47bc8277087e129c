//! A daemon a test runs of its own (dockerd, containerd), handled as a service manager would:
//! its log in a file, ready once it answers, stopped with SIGTERM (SIGKILL after 30 s).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Service {
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    /// Runs `command` with its standard error in `log`, and waits up to 60 s for `ready`.
    pub fn start(mut command: Command, log: PathBuf, mut ready: impl FnMut() -> bool) -> Service {
        let program = command.get_program().to_string_lossy().into_owned();
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("{program} (from Debian's packages) is installed: {error}")
            });
        let service = Service {
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "{program} never answered; its log: {}",
                service.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        service
    }

    /// The last 30 lines of its log.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut tail: Vec<&str> = log.lines().rev().take(30).collect();
        tail.reverse();
        tail.join("\n")
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}
