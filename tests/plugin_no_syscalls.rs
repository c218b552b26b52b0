//! The audio thread never locks, waits or wakes anyone: a whole take (a phrase, the worker's
//! answer streamed back, parameter changes) is processed on a thread whose system calls for
//! waiting, waking and file I/O are forbidden by a seccomp filter. A contended lock or a wake-up
//! (`futex`), a sleep, a yield, a read or a write there kills the child process that runs the
//! take, naming the call; the test runs the take in such a child and requires it to finish.
//! Allocation is caught separately: the debug bundle aborts on it. Linux on x86-64 only, where
//! the filter's system call numbers hold. Needs `cargo xtask bundle antiphon` first.

mod plugin_host;

/// Set in the child process that runs the guarded take.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
const CHILD_VAR: &str = "ANTIPHON_GUARDED_TAKE";

/// What the child says when the system refuses it a seccomp filter (some sandboxes do).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
const NO_SECCOMP: &str = "no seccomp filter could be installed here";

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod guard {
    use std::sync::atomic::{AtomicI32, Ordering};

    /// x86-64 system call numbers the audio thread must never make.
    const FORBIDDEN: [(u32, &str); 9] = [
        (0, "read"),
        (1, "write"),
        (7, "poll"),
        (24, "sched_yield"),
        (35, "nanosleep"),
        (202, "futex"),
        (230, "clock_nanosleep"),
        (257, "openat"),
        (271, "ppoll"),
    ];

    static TRAPPED: AtomicI32 = AtomicI32::new(-1);

    /// Writes the trapped call's name to standard error (through a raw `write` to fd 2, which
    /// the filter lets through) and ends the process.
    extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo; for SIGSYS from seccomp the syscall number
        // sits after the signal fields (`si_syscall`, at byte 24 of the x86-64 layout).
        let number = unsafe { *((info as *const u8).add(24) as *const libc::c_int) };
        TRAPPED.store(number, Ordering::Relaxed);
        let name = FORBIDDEN.iter().find(|(n, _)| *n as i32 == number).map_or("?", |(_, name)| name);
        let message = b"the audio thread made a forbidden system call: ";
        // SAFETY: plain writes of valid buffers to fd 2, then `_exit`: async-signal-safe calls.
        unsafe {
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::write(2, name.as_ptr().cast(), name.len());
            libc::write(2, b"\n".as_ptr().cast(), 1);
            libc::_exit(86);
        }
    }

    /// Forbids the calls of `FORBIDDEN` on the calling thread (a `write` to fd 2 excepted), or
    /// says why this system cannot (a sandbox that forbids seccomp filters itself).
    pub fn install() -> Result<(), String> {
        // SAFETY: installs a plain signal handler.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            assert_eq!(libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()), 0);
        }
        const LD_W_ABS: u16 = 0x20;
        const JEQ_K: u16 = 0x15;
        const RET_K: u16 = 0x06;
        const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
        let stmt = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
        let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter { code: JEQ_K, jt, jf, k };
        let mut program = vec![
            // Only x86-64 calls are judged; anything else is allowed.
            stmt(LD_W_ABS, 4),
            jump(AUDIT_ARCH_X86_64, 1, 0),
            stmt(RET_K, libc::SECCOMP_RET_ALLOW),
            stmt(LD_W_ABS, 0),
            // write(2, ...) is allowed: the trap handler reports through it.
            jump(1, 0, 3),
            stmt(LD_W_ABS, 16),
            jump(2, 0, 1),
            stmt(RET_K, libc::SECCOMP_RET_ALLOW),
            stmt(LD_W_ABS, 0),
        ];
        for (number, _) in FORBIDDEN {
            program.push(jump(number, 0, 1));
            program.push(stmt(RET_K, libc::SECCOMP_RET_TRAP));
        }
        program.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
        let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
        // SAFETY: `fprog` points at a valid program for the duration of the call; the filter
        // applies to this thread only (no TSYNC flag).
        let installed = unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                && libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) == 0
        };
        match installed {
            true => Ok(()),
            false => Err(std::io::Error::last_os_error().to_string()),
        }
    }
}

/// The take, in the child: the plugin is loaded and activated on the main thread, then every
/// block is processed on a guarded thread.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn guarded_take() {
    use plugin_host::{notes_on, Plugin, Take};

    let mut plugin = Plugin::load();
    plugin.set(&[("Output Channel", "2"), ("Fresh Seed", "Off"), ("Answer Length", "2")]);
    plugin.set_offline(false);
    let notes: Vec<(u8, f64, f64)> = [62, 64, 66, 67, 69, 67, 66, 64]
        .iter()
        .enumerate()
        .map(|(i, &k)| (k, i as f64 * 0.5, 0.45))
        .collect();
    // The phrase ends a beat after its last note, the answer fills bars 3 and 4 (beats 8 to 16).
    let mut take = Take::new(120.0, notes, 18.0);
    // Paced like a host's audio callback (by spinning: a sleep is a system call), so the worker
    // streams the answer while the guarded thread plays it.
    take.is_paced = true;
    take.is_spin_paced = true;
    let mut processor = plugin.activate(48_000.0, 256);
    // Let the worker load its model before the take starts, as a player would.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (processor, heard) = std::thread::spawn(move || {
        if let Err(reason) = guard::install() {
            return (processor, Err(reason));
        }
        let heard = take.perform(&mut processor, 256);
        (processor, Ok(heard))
    })
    .join()
    .expect("the guarded thread ran the take");
    plugin.deactivate(processor);
    let heard = match heard {
        Ok(heard) => heard,
        Err(reason) => {
            println!("{NO_SECCOMP}: {reason}");
            return;
        }
    };
    assert!(!notes_on(&heard, 1).is_empty(), "the take got no answer, so it proves little");
    println!("guarded take done: {} answer notes", notes_on(&heard, 1).len());
}

#[test]
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn the_audio_thread_makes_no_blocking_system_call() {
    if std::env::var_os(CHILD_VAR).is_some() {
        guarded_take();
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "the_audio_thread_makes_no_blocking_system_call",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_VAR, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the guarded take failed ({}):\n{stderr}\n{stdout}", output.status);
    if let Some(line) = stdout.lines().find(|line| line.starts_with(NO_SECCOMP)) {
        // Nothing can be checked on such a system; say so rather than pass in silence.
        eprintln!("not checked: {line}");
        return;
    }
    assert!(stdout.contains("guarded take done"), "the child did not run the take:\n{stdout}");
}
