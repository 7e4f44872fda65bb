//! A SIGTERM right after kvtierd announces its addresses drains it: the
//! signal handlers are installed before it serves, not on first poll.

use kvtier_testkit as common;

use common::Daemon;

#[test]
fn sigterm_right_after_startup_drains() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..20 {
        let mut d = Daemon::start(&dir.path().join(i.to_string()), &[]);
        let status = d.signal_and_wait(libc::SIGTERM);
        assert!(status.success(), "start {i}: {status:?}");
    }
}
