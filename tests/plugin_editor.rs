//! The editor, through the built bundle as a host opens it: embedded in an X11 window (an Xvfb
//! server is started when no display is set), while a take plays on an audio thread. It draws
//! the phrase and the answer, melody and chords (checked by their colours in a screenshot of
//! the window), and opening and closing it while playing changes nothing in the output.
//!
//! `ANTIPHON_SCREENSHOTS=DIR` also writes the screenshots into DIR (the README's comes from
//! here: `ANTIPHON_SCREENSHOTS=docs`).

mod plugin_host;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use plugin_host::{assert_balanced, Heard, Plugin, Processor, Take};
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{ConnectionExt, CreateWindowAux, ImageFormat, Window, WindowClass};
use x11rb::rust_connection::RustConnection;
use x11rb::COPY_DEPTH_FROM_PARENT;

/// The editor's colours for the phrase's notes and the answer's (see `src/editor.rs`).
const PHRASE_RGB: [u8; 3] = [90, 160, 240];
const ANSWER_RGB: [u8; 3] = [245, 160, 60];

/// Fast enough that a take is short, slow enough for the window to draw mid-answer.
const TEMPO_BPM: f64 = 240.0;
const SAMPLE_RATE_HZ: f64 = 48_000.0;
const BLOCK_LEN: u32 = 256;

/// A display to open windows on: `$DISPLAY`, or an Xvfb server started for this test run
/// (it ends when its last client, this process, goes).
fn display() -> &'static str {
    static DISPLAY: OnceLock<(String, Option<Child>)> = OnceLock::new();
    &DISPLAY
        .get_or_init(|| {
            if let Some(display) = std::env::var("DISPLAY").ok().filter(|d| !d.is_empty()) {
                return (display, None);
            }
            let number = 90 + std::process::id() % 400;
            let display = format!(":{number}");
            let server = Command::new("Xvfb")
                .args([&display, "-screen", "0", "1280x1024x24", "-nolisten", "tcp", "-terminate"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("no $DISPLAY, and Xvfb could not start ({e}): install xvfb"));
            let socket = PathBuf::from(format!("/tmp/.X11-unix/X{number}"));
            let started = Instant::now();
            while !socket.exists() {
                assert!(started.elapsed() < Duration::from_secs(10), "Xvfb did not open {display}");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::env::set_var("DISPLAY", &display);
            (display, Some(server))
        })
        .0
}

/// A host window on the display, to embed the editor in and to read back.
struct HostWindow {
    conn: RustConnection,
    root: Window,
    window: Window,
    size: (u16, u16),
}

impl HostWindow {
    fn open(width: u32, height: u32) -> HostWindow {
        let (conn, screen_idx) = x11rb::connect(Some(display())).expect("connect to the X server");
        let screen = &conn.setup().roots[screen_idx];
        let (root, black) = (screen.root, screen.black_pixel);
        let window = conn.generate_id().unwrap();
        let size = (width as u16, height as u16);
        conn.create_window(
            COPY_DEPTH_FROM_PARENT,
            window,
            root,
            0,
            0,
            size.0,
            size.1,
            0,
            WindowClass::INPUT_OUTPUT,
            0,
            &CreateWindowAux::new().background_pixel(black),
        )
        .unwrap();
        conn.map_window(window).unwrap();
        // A round trip: the server has made the window before the editor's own connection asks
        // to embed itself in it.
        conn.get_input_focus().unwrap().reply().unwrap();
        HostWindow { conn, root, window, size }
    }

    /// What the screen shows of the window, as RGB rows.
    fn pixels(&self) -> Vec<[u8; 3]> {
        let (w, h) = self.size;
        let image =
            self.conn.get_image(ImageFormat::Z_PIXMAP, self.root, 0, 0, w, h, !0).unwrap().reply().unwrap();
        assert_eq!(image.depth, 24, "a 24-bit display");
        // 32 bits a pixel, blue first.
        image.data.chunks_exact(4).map(|px| [px[2], px[1], px[0]]).collect()
    }

    /// Pixels within a little of `rgb`.
    fn count(&self, pixels: &[[u8; 3]], rgb: [u8; 3]) -> usize {
        pixels.iter().filter(|px| px.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 6)).count()
    }

    fn save_png(&self, pixels: &[[u8; 3]], name: &str) {
        let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        let mut dirs = vec![target];
        if let Ok(dir) = std::env::var("ANTIPHON_SCREENSHOTS") {
            dirs.push(Path::new(&dir).join(name));
        }
        for path in dirs {
            let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut encoder = png::Encoder::new(file, u32::from(self.size.0), u32::from(self.size.1));
            encoder.set_color(png::ColorType::Rgb);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&pixels.concat()).unwrap();
        }
    }
}

impl Drop for HostWindow {
    fn drop(&mut self) {
        let _ = self.conn.destroy_window(self.window);
        let _ = self.conn.flush();
    }
}

/// An instance set for the same answer every time: offline (the audio thread waits for the
/// worker, so timing cannot change the notes) and a fixed seed.
fn fixed_instance(plugin: &Plugin) -> Plugin {
    let mut instance = plugin.another();
    instance.set(&[("Fresh Seed", "Off"), ("Seed", "7")]);
    instance.set_offline(true);
    instance.select_layout(false);
    instance
}

/// Two bars of a tune, then silence.
fn melody_take() -> Take {
    let tune = [67, 69, 71, 72, 74, 72, 71, 69];
    let notes = tune.iter().enumerate().map(|(i, &k)| (k, i as f64, 0.9)).collect();
    Take::new(TEMPO_BPM, notes, 22.0)
}

/// Two bars of chords, both hands: C, F, G, C.
fn chord_take() -> Take {
    let chords: [&[u8]; 4] = [&[48, 60, 64, 67], &[53, 60, 65, 69], &[55, 59, 62, 67], &[48, 60, 64, 67]];
    let mut notes = Vec::new();
    for (bar, chord) in chords.iter().enumerate() {
        for &key in *chord {
            notes.push((key, bar as f64 * 2.0, 1.9));
        }
    }
    Take::new(TEMPO_BPM, notes, 22.0)
}

/// Plays `take` in real time on an audio thread while `gui` runs on this (the main) thread with
/// the seconds since the take began; returns what the plugin sent.
fn play_while(take: &Take, processor: &mut Processor, gui: impl FnOnce(&dyn Fn() -> f64)) -> Vec<Heard> {
    let mut paced = take.clone();
    paced.is_paced = true;
    std::thread::scope(|scope| {
        let started = Instant::now();
        let audio = scope.spawn(|| paced.perform(processor, BLOCK_LEN));
        gui(&|| started.elapsed().as_secs_f64());
        audio.join().expect("the audio thread")
    })
}

fn wait_until(elapsed: &dyn Fn() -> f64, seconds: f64) {
    while elapsed() < seconds {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_editor_draws_phrase_and_answer_and_changes_nothing_in_the_output() {
    display();
    let plugin = Plugin::load();

    // What the take sounds like with no editor.
    let mut reference = fixed_instance(&plugin);
    let mut processor = reference.activate(SAMPLE_RATE_HZ, BLOCK_LEN);
    let unseen = melody_take().perform(&mut processor, BLOCK_LEN);
    reference.deactivate(processor);
    let answer = assert_balanced(&unseen).into_iter().filter(|n| n.1 == 0 && n.2 >= 12.0).count();
    assert!(answer > 0, "the reference take has an answer: {unseen:?}");

    // The same take with the editor opened before it, closed mid-answer and opened again.
    let mut watched = fixed_instance(&plugin);
    let mut processor = watched.activate(SAMPLE_RATE_HZ, BLOCK_LEN);
    let mut window = None;
    let mut melody_pixels = Vec::new();
    let seen = play_while(&melody_take(), &mut processor, |elapsed| {
        watched.open_editor(|w, h| {
            let host = HostWindow::open(w, h);
            let id = host.window;
            window = Some(host);
            u64::from(id)
        });
        // Beat 15: the answer plays (it started on beat 12), with notes written ahead.
        wait_until(elapsed, 15.0 * 60.0 / TEMPO_BPM);
        melody_pixels = window.as_ref().unwrap().pixels();
        watched.close_editor();
        wait_until(elapsed, 17.0 * 60.0 / TEMPO_BPM);
        watched.open_editor(|_, _| u64::from(window.as_ref().unwrap().window));
    });
    assert_eq!(seen, unseen, "the editor changed the output");
    let host = window.as_ref().unwrap();
    host.save_png(&melody_pixels, "editor-melody.png");
    let phrase_px = host.count(&melody_pixels, PHRASE_RGB);
    let answer_px = host.count(&melody_pixels, ANSWER_RGB);
    assert!(phrase_px > 500 && answer_px > 200, "phrase {phrase_px} px, answer {answer_px} px");

    // Chords, with the editor still open: drawn as chords.
    let chords = play_while(&chord_take(), &mut processor, |elapsed| {
        wait_until(elapsed, 15.0 * 60.0 / TEMPO_BPM);
    });
    std::thread::sleep(Duration::from_millis(300));
    let chord_pixels = host.pixels();
    host.save_png(&chord_pixels, "editor.png");
    let notes = assert_balanced(&chords);
    let answer_notes: Vec<_> = notes.iter().filter(|n| n.1 == 0 && n.2 >= 12.0).collect();
    let most_at_once = answer_notes
        .iter()
        .map(|a| answer_notes.iter().filter(|b| b.2 <= a.2 && a.2 < b.3).count())
        .max()
        .unwrap_or(0);
    assert!(most_at_once >= 2, "the chord phrase got chords: {answer_notes:?}");
    let phrase_px = host.count(&chord_pixels, PHRASE_RGB);
    let answer_px = host.count(&chord_pixels, ANSWER_RGB);
    assert!(phrase_px > 2000 && answer_px > 500, "phrase {phrase_px} px, answer {answer_px} px");
    watched.close_editor();
    watched.deactivate(processor);
}
