//! The built plugin starts no thread and loads no model when a host scans or creates it; its
//! worker starts on activation and is joined on deactivation and when the instance goes. Needs
//! `cargo xtask bundle antiphon` first. One test only: it counts the process's threads.

mod plugin_host;

use plugin_host::{thread_names, Plugin};

fn workers() -> usize {
    thread_names().iter().filter(|name| name.as_str() == "antiphon-worker").count()
}

/// Waits (up to a second) for a worker beyond `baseline`: a thread names itself only once it
/// runs.
fn started_workers(baseline: usize) -> usize {
    let started = std::time::Instant::now();
    while workers() == baseline && started.elapsed() < std::time::Duration::from_secs(1) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    workers() - baseline
}

#[test]
fn the_worker_lives_from_activation_to_deactivation() {
    if !std::path::Path::new("/proc/self/task").exists() {
        eprintln!("skipped: threads are counted through /proc, which this system lacks");
        return;
    }
    assert_eq!(workers(), 0);
    let mut plugin = Plugin::load();
    assert_eq!(workers(), 0, "a thread started at scan time");
    let processor = plugin.activate(48_000.0, 512);
    assert_eq!(started_workers(0), 1);
    plugin.deactivate(processor);
    // Candle's compute pool has names of its own ("antiphon-pool0"...), so it is not counted.
    assert_eq!(workers(), 0, "the worker outlived deactivation");
    // Activate twice in a row, then drop the instance while active.
    let processor = plugin.activate(44_100.0, 64);
    assert_eq!(started_workers(0), 1);
    plugin.deactivate(processor);
    assert_eq!(workers(), 0, "the worker outlived deactivation");
    let processor = plugin.activate(96_000.0, 64);
    assert_eq!(started_workers(0), 1);
    drop(processor);
    drop(plugin);
    assert_eq!(workers(), 0, "the worker outlived the instance");
}
