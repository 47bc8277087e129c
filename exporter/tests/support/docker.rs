//! A Docker daemon of a test's own (Debian's `docker.io`), and an image made of one static
//! busybox (no registry is reachable).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::service::Service;

/// A Docker daemon of the test's own: its own data, socket and containerd, and no default
/// bridge. It keeps its iptables rules: where bridged traffic passes the host's firewall (with
/// a forward policy of DROP, as any Docker host has), containers reach each other only through
/// them.
pub struct DockerDaemon {
    dir: PathBuf,
    service: Option<Service>,
}

impl DockerDaemon {
    pub fn start(dir: &Path) -> DockerDaemon {
        std::fs::create_dir_all(dir).unwrap();
        let mut daemon = DockerDaemon {
            dir: dir.to_owned(),
            service: None,
        };
        daemon.launch();
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    fn launch(&mut self) {
        let mut command = Command::new("dockerd");
        command
            .arg("--data-root")
            .arg(self.dir.join("root"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(["--bridge", "none"]);
        self.service = Some(Service::start(
            command,
            self.dir.join("dockerd.log"),
            || self.docker(&["version"]).status.success(),
        ));
    }

    /// Stops the daemon as a service manager would (its containers stop with it), calls
    /// `while_away`, and starts it again on the same data.
    pub fn restart(&mut self, while_away: impl FnOnce()) {
        self.service = None;
        while_away();
        self.launch();
    }

    pub fn docker(&self, args: &[&str]) -> std::process::Output {
        // Debian's client matches Debian's daemon; any other on the PATH negotiates down.
        let client = if Path::new("/usr/bin/docker").exists() {
            "/usr/bin/docker"
        } else {
            "docker"
        };
        Command::new(client)
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .output()
            .expect("the docker client runs")
    }

    pub fn must(&self, args: &[&str]) -> String {
        let output = self.docker(args);
        assert!(
            output.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for DockerDaemon {
    fn drop(&mut self) {
        if self.service.is_some() {
            let running = self.docker(&["ps", "-aq"]);
            for id in String::from_utf8_lossy(&running.stdout).split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
            // A network outlives its daemon: its bridge and firewall rules would stay on the
            // host, and the next run's bridge on the same subnet would fight this one's route.
            let networks = self.docker(&["network", "ls", "-q", "--filter", "type=custom"]);
            for id in String::from_utf8_lossy(&networks.stdout).split_whitespace() {
                let _ = self.docker(&["network", "rm", id]);
            }
        }
        self.service = None;
        // Overlay mounts of stopped containers are gone with the daemon; what is left is files.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("exec"))
            .status();
    }
}

/// An image of one static busybox and a page for its httpd, imported from a tarball.
pub fn import_busybox(daemon: &DockerDaemon, dir: &Path) -> &'static str {
    let root = dir.join("image");
    super::busybox_rootfs(&root);
    let tarball = dir.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    daemon.must(&[
        "import",
        &tarball.display().to_string(),
        "flowattr-test/busybox:1",
    ]);
    "flowattr-test/busybox:1"
}
