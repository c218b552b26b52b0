//! Fuzzes the plugin's saved state through its CLAP entry, as a host restores a project: any
//! bytes given to `clap.state`'s `load` are taken or refused, never a crash, and whatever was
//! given, the plugin's state afterwards saves and loads back. Inputs with an odd first byte are
//! edits of a valid saved state (pairs of position and byte), so the fuzzer also explores states
//! that are almost right.
//! Runs on: the fuzzer's thread, which plays the host's main thread.

#![no_main]

use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::sync::OnceLock;

use clap_sys::ext::state::{clap_plugin_state, CLAP_EXT_STATE};
use clap_sys::factory::plugin_factory::{clap_plugin_factory, CLAP_PLUGIN_FACTORY_ID};
use clap_sys::host::clap_host;
use clap_sys::plugin::clap_plugin;
use clap_sys::stream::{clap_istream, clap_ostream};
use clap_sys::version::CLAP_VERSION;
use libfuzzer_sys::fuzz_target;

/// The plugin instance the inputs are loaded into, and a state it saved before any input.
struct Instance {
    plugin: *const clap_plugin,
    state: *const clap_plugin_state,
    valid_state: Vec<u8>,
}

// SAFETY: the fuzzer calls the target from one thread only; the pointers never leave it.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

unsafe extern "C" fn no_extension(_host: *const clap_host, _id: *const std::ffi::c_char) -> *const c_void {
    std::ptr::null()
}

unsafe extern "C" fn ignore(_host: *const clap_host) {}

/// Reads from the `(bytes, position)` pair behind `ctx`.
unsafe extern "C" fn read(stream: *const clap_istream, buffer: *mut c_void, size: u64) -> i64 {
    // SAFETY: `ctx` is the `Reader` that `load` passed, alive for the call.
    let reader = unsafe { &mut *((*stream).ctx as *mut Reader) };
    let rest = &reader.bytes[reader.position..];
    let len = rest.len().min(size as usize);
    // SAFETY: the plugin gives a buffer of `size` bytes.
    unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), buffer as *mut u8, len) };
    reader.position += len;
    len as i64
}

/// Appends to the `Vec<u8>` behind `ctx`.
unsafe extern "C" fn write(stream: *const clap_ostream, buffer: *const c_void, size: u64) -> i64 {
    // SAFETY: `ctx` is the `Vec` that `save` passed, alive for the call; `buffer` holds `size`
    // bytes.
    unsafe {
        let out = &mut *((*stream).ctx as *mut Vec<u8>);
        out.extend_from_slice(std::slice::from_raw_parts(buffer as *const u8, size as usize));
    }
    size as i64
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Instance {
    fn get() -> &'static Instance {
        static INSTANCE: OnceLock<Instance> = OnceLock::new();
        INSTANCE.get_or_init(|| {
            let host = Box::leak(Box::new(clap_host {
                clap_version: CLAP_VERSION,
                host_data: null_mut(),
                name: c"fuzz".as_ptr(),
                vendor: c"fuzz".as_ptr(),
                url: c"".as_ptr(),
                version: c"0".as_ptr(),
                get_extension: Some(no_extension),
                request_restart: Some(ignore),
                request_process: Some(ignore),
                request_callback: Some(ignore),
            }));
            let entry = &antiphon::clap_entry;
            // SAFETY: the plugin's own entry point, used as a host would: init, factory, create,
            // init the instance, then its state extension.
            unsafe {
                assert!((entry.init.unwrap())(c"".as_ptr()));
                let factory = (entry.get_factory.unwrap())(CLAP_PLUGIN_FACTORY_ID.as_ptr()) as *const clap_plugin_factory;
                let id: &CStr = c"org.antiphon.antiphon";
                let plugin = ((*factory).create_plugin.unwrap())(factory, host, id.as_ptr());
                assert!(!plugin.is_null());
                assert!(((*plugin).init.unwrap())(plugin));
                let state = ((*plugin).get_extension.unwrap())(plugin, CLAP_EXT_STATE.as_ptr()) as *const clap_plugin_state;
                assert!(!state.is_null());
                let mut instance = Instance { plugin, state, valid_state: Vec::new() };
                instance.valid_state = instance.save();
                instance
            }
        })
    }

    fn load(&self, bytes: &[u8]) -> bool {
        let mut reader = Reader { bytes, position: 0 };
        let stream = clap_istream { ctx: &mut reader as *mut Reader as *mut c_void, read: Some(read) };
        // SAFETY: a live instance and a stream that outlives the call.
        unsafe { ((*self.state).load.unwrap())(self.plugin, &stream) }
    }

    fn save(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let stream = clap_ostream { ctx: &mut out as *mut Vec<u8> as *mut c_void, write: Some(write) };
        // SAFETY: as in `load`.
        assert!(unsafe { ((*self.state).save.unwrap())(self.plugin, &stream) }, "the state does not save");
        out
    }
}

fuzz_target!(|input: &[u8]| {
    let instance = Instance::get();
    let bytes = match input.split_first() {
        Some((first, edits)) if first % 2 == 1 => {
            let mut state = instance.valid_state.clone();
            for edit in edits.chunks_exact(3) {
                let at = u16::from_le_bytes([edit[0], edit[1]]) as usize % state.len().max(1);
                state[at] = edit[2];
            }
            state
        }
        _ => input.to_vec(),
    };
    instance.load(&bytes);
    // Whatever happened, the plugin's state is whole: it saves, and loads back as itself.
    let saved = instance.save();
    assert!(instance.load(&saved), "the plugin refuses its own state");
    assert_eq!(instance.save(), saved, "the state changed on a round trip");
});
