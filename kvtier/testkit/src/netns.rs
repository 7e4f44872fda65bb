//! A network namespace of the test's own, and partitions in it.
//!
//! A test that cuts a node off from its peers runs in a fresh network
//! namespace (`unshare --net`; with `--user --map-root-user` when not
//! root, where user namespaces are allowed) whose
//! only interface is `lo`: nothing it does can leave the machine or touch
//! the machine's own routing. Each node listens on, and connects from, a
//! loopback address of its own (127.0.0.x; see
//! [`crate::cluster::Nodes::start_gossip_at`]). A partition is a pair of
//! policy-routing rules per peer (`ip rule ... blackhole`) that the kernel
//! applies to every packet between the two addresses, both ways, on
//! connections old and new: the node keeps running and serving, and the
//! test's own clients, on 127.0.0.1, still reach every node. A blackhole
//! route fails a send at once (`EINVAL`) where a real network would drop
//! it silently; either way, nothing arrives.
//!
//! Needs `unshare` (util-linux) and `ip` (iproute2); `scripts/setup.sh`
//! installs them.

use std::process::Command;

/// Set in the re-run test: it is in the namespace.
const INSIDE: &str = "KVTIER_TEST_NETNS";

/// Runs the calling test, named `test` as `cargo test` lists it, again in
/// a fresh network namespace and checks that it ran and passed there.
/// Answers `false` here (the caller returns: its work was done in the
/// namespace) and `true` in the namespace (the caller goes on), where
/// `lo` is up and partitions can be made.
pub fn enter(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        setup();
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut unshare = Command::new("unshare");
    if !root {
        // A user namespace of its own gives the test the right to set up
        // the network namespace's routing, without root.
        unshare.args(["--user", "--map-root-user"]);
    }
    let out = unshare
        .arg("--net")
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .output()
        .expect("run unshare (util-linux; scripts/setup.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- {test} in its network namespace ---\n{stdout}{stderr}--- end of {test} ---");
    assert!(
        out.status.success(),
        "{test} failed in its network namespace: {}",
        out.status
    );
    // A name that matched nothing would pass having run nothing.
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{test} did not run in its network namespace"
    );
    false
}

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (iproute2; scripts/setup.sh installs it)");
    assert!(st.success(), "ip {}: {st}", args.join(" "));
}

/// `lo` up, and the local routing table looked up after the rules a
/// partition adds (it comes first, at preference 0, in a new namespace:
/// every loopback address would be delivered before any rule could
/// drop it).
fn setup() {
    ip(&["link", "set", "lo", "up"]);
    ip(&["rule", "add", "pref", "100", "lookup", "local"]);
    ip(&["rule", "del", "pref", "0"]);
}

/// One address cut off from others: every packet between it and each of
/// them is dropped, both ways, until [`Partition::heal`] (or drop).
#[derive(Debug)]
pub struct Partition {
    rules: Vec<[String; 4]>,
}

impl Partition {
    /// Cuts `ip` off from each of `others`.
    pub fn cut(ip: &str, others: &[&str]) -> Partition {
        let mut rules = Vec::new();
        for o in others {
            for (from, to) in [(ip, *o), (*o, ip)] {
                let pref = (10 + rules.len()).to_string();
                let rule = [pref, from.to_string(), to.to_string(), "blackhole".to_string()];
                Self::rule("add", &rule);
                rules.push(rule);
            }
        }
        Partition { rules }
    }

    fn rule(op: &str, [pref, from, to, action]: &[String; 4]) {
        ip(&["rule", op, "pref", pref, "from", from, "to", to, action]);
    }

    /// Lets the packets through again.
    pub fn heal(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        for r in std::mem::take(&mut self.rules) {
            Self::rule("del", &r);
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.remove();
        }
    }
}
