//! The editor: a piano roll of the last phrase and its answer as it streams in, the state at a
//! glance, the buttons that steer the answer (Answer Now, Try Again, Variations, Save answer),
//! presets, the model picker and every parameter in named groups.
//! Runs on: the editor's GUI thread. It reads what the audio thread and the worker publish
//! (atomics, and an `Arc` the worker swaps) and writes only through the host's parameter
//! calls and the steer atomic, so opening, drawing or closing it never blocks either.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use egui::{self, Align2, Color32, FontId, Pos2, Rect, Sense, Stroke, StrokeKind, Ui, Vec2};
use nice_plug::context::gui::GuiContext;
use nice_plug::editor::dpi::LogicalSize;
use nice_plug::prelude::{Param, ParamSetter};
use nice_plug_egui::widgets::ParamSlider;
use nice_plug_egui::{
    create_egui_editor, EguiEditor, EguiEditorState, EguiNiceSettings, NiceEguiApp, RepaintNotifier,
};

use live::phrase::LiveShared;
use live::steer::{Stage, Steer};
use music::note::Note;

use crate::engine::{EngineState, EngineStatus, ModelSource, Shown, Voicing};
use crate::keep::{answers_folder, save_answer};
use crate::params::AntiphonParams;
use crate::presets::{self, Listed, Preset, PresetOrigin};

/// The editor's size in logical pixels.
pub const EDITOR_SIZE: (u32, u32) = (1120, 700);

/// How often the editor redraws while it is open: the playhead moves.
const REDRAW_EVERY: Duration = Duration::from_millis(33);

const PHRASE_COLOR: Color32 = Color32::from_rgb(90, 160, 240);
const ANSWER_COLOR: Color32 = Color32::from_rgb(245, 160, 60);
const PLAYHEAD_COLOR: Color32 = Color32::from_rgb(240, 70, 70);
const ROLL_BACKGROUND: Color32 = Color32::from_rgb(28, 30, 36);
const BLACK_KEY_ROW: Color32 = Color32::from_rgb(22, 24, 29);

/// The editor's initial state (its size).
pub fn default_state() -> Arc<EguiEditorState> {
    EguiEditorState::from_size(LogicalSize::new(EDITOR_SIZE.0, EDITOR_SIZE.1), 1.0)
}

/// The editor over the plugin's parameters and what the audio thread and the worker publish.
pub fn create(
    state: Arc<EguiEditorState>,
    params: Arc<AntiphonParams>,
    live: Arc<LiveShared>,
    status: Arc<EngineStatus>,
) -> Option<EguiEditor<EditorApp>> {
    let app = EditorApp {
        params,
        live,
        status,
        context: None,
        presets: Vec::new(),
        preset_idx: None,
        preset_name: String::new(),
        model_folder: String::new(),
        message: String::new(),
    };
    let settings = EguiNiceSettings::new().with_tile("Antiphon");
    create_egui_editor(state, RepaintNotifier::new(), settings, app)
}

/// The editor's one typeface, Ubuntu Light, for both of egui's families: its text is Latin, and
/// egui draws its widgets' marks (ticks, arrows) itself. A character the font lacks is drawn as
/// a box.
fn fonts() -> egui::FontDefinitions {
    const NAME: &str = "Ubuntu-Light";
    let mut fonts = egui::FontDefinitions::empty();
    fonts
        .font_data
        .insert(NAME.into(), Arc::new(egui::FontData::from_static(epaint_default_fonts::UBUNTU_LIGHT)));
    for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
        fonts.families.insert(family, vec![NAME.into()]);
    }
    fonts
}

/// The editor's own state; the host's window runs it.
pub struct EditorApp {
    params: Arc<AntiphonParams>,
    live: Arc<LiveShared>,
    status: Arc<EngineStatus>,
    /// The host's parameter calls, once the window is built.
    context: Option<GuiContext>,
    /// Factory and user presets, read when the window opens.
    presets: Vec<Listed>,
    preset_idx: Option<usize>,
    preset_name: String,
    model_folder: String,
    /// The last thing a button did, or why it could not.
    message: String,
}

impl NiceEguiApp for EditorApp {
    fn build(
        &mut self,
        egui_ctx: egui::Context,
        context: GuiContext,
        _frame: &mut nice_plug_egui::Frame,
    ) -> Result<(), nice_plug_egui::baseview::HandlerError> {
        egui_ctx.set_fonts(fonts());
        self.context = Some(context);
        self.presets = presets::list(presets::user_presets_folder().as_deref());
        Ok(())
    }

    fn ui(&mut self, ui: &mut Ui, _frame: &mut nice_plug_egui::Frame) {
        ui.ctx().request_repaint_after(REDRAW_EVERY);
        let Some(context) = self.context.clone() else { return };
        let setter = context.param_setter();
        let shown = self.status.shown();
        egui::Frame::new().inner_margin(8.0).show(ui, |ui| {
            self.status_bar(ui, &shown);
            ui.add_space(4.0);
            let playhead = self.playhead_beats(&shown);
            piano_roll(ui, &shown, playhead, self.params.answer.answer_bars.value() as f64);
            ui.add_space(4.0);
            self.steering(ui, &shown);
            ui.separator();
            self.presets_and_model(ui, &context, &setter);
            ui.separator();
            parameter_groups(ui, &self.params, &setter);
            if !self.message.is_empty() {
                ui.separator();
                ui.label(&self.message);
            }
        });
    }
}

impl EditorApp {
    /// The playhead in beats from the playing answer's start, while an answer plays or waits.
    fn playhead_beats(&self, shown: &Shown) -> Option<f64> {
        let is_answering = self.live.active_answer_id.load(Ordering::Acquire) != 0;
        (is_answering && shown.playing.is_some()).then(|| self.live.playhead_beats.load(Ordering::Acquire))
    }

    /// Stage, model, key, timing and trouble, in one line each.
    fn status_bar(&self, ui: &mut Ui, shown: &Shown) {
        let stage = self.live.steer.stage();
        let stage_color = match stage {
            Stage::Listening | Stage::Yielded => Color32::from_rgb(120, 200, 120),
            Stage::PhraseEnding => Color32::from_rgb(230, 210, 90),
            Stage::Thinking => Color32::from_rgb(200, 140, 240),
            Stage::Answering => ANSWER_COLOR,
        };
        ui.horizontal(|ui| {
            ui.heading("Antiphon");
            ui.add_space(12.0);
            ui.label(egui::RichText::new(stage.label()).color(stage_color).strong());
            ui.add_space(12.0);
            let state = self.status.state();
            let model = match state {
                EngineState::Stopped => "Not running (the host has not activated the plugin)".to_string(),
                EngineState::Loading => format!("Loading {}", self.status.detail()),
                EngineState::Ready => format!("Model: {}", self.status.detail()),
                EngineState::Fallback => format!("Fallback: {}", self.status.detail()),
                EngineState::Failed => format!("No model: {}", self.status.detail()),
            };
            let color = match state {
                EngineState::Fallback | EngineState::Failed => Color32::from_rgb(240, 120, 90),
                _ => ui.visuals().text_color(),
            };
            ui.label(egui::RichText::new(model).color(color));
        });
        ui.horizontal(|ui| {
            if let Some(answer) = shown.playing() {
                let voicing = match answer.voicing {
                    Voicing::Melody => "a melody",
                    Voicing::Chords => "chords",
                };
                ui.label(format!("Last answer: {voicing} by {}", answer.model));
                let heard =
                    answer.heard_key.map_or("no key heard".to_string(), |key| format!("heard in {key}"));
                let key = match answer.key {
                    Some(key) => format!("{heard}, locked to {key}"),
                    None => format!("{heard}, no key lock"),
                };
                ui.label(key);
                if let Some(ms) = answer.first_note_ms {
                    ui.label(format!("first note written {ms:.1} ms after the phrase ended"));
                }
            } else {
                ui.label("Play a phrase: Antiphon answers when you pause.");
            }
            let counts = [
                (self.live.num_dropped_requests.load(Ordering::Relaxed), "dropped requests"),
                (self.live.num_late_notes.load(Ordering::Relaxed), "late notes"),
                (self.live.num_lost_events.load(Ordering::Relaxed), "lost events"),
            ];
            for (count, what) in counts.into_iter().filter(|(count, _)| *count > 0) {
                ui.label(
                    egui::RichText::new(format!("{count} {what}")).color(Color32::from_rgb(240, 120, 90)),
                );
            }
        });
    }

    /// Answer Now, Try Again, the Variations and Save answer.
    fn steering(&mut self, ui: &mut Ui, shown: &Shown) {
        ui.horizontal(|ui| {
            if ui.button("Answer Now").on_hover_text("End the phrase now and answer it").clicked() {
                self.live.steer.send(Steer::AnswerNow);
            }
            let has_phrase = shown.phrase.is_some();
            let try_again = ui.add_enabled(has_phrase, egui::Button::new("Try Again"));
            if try_again.on_hover_text("A new answer to the same phrase, from a new seed").clicked() {
                self.live.steer.send(Steer::TryAgain);
            }
            ui.add_space(12.0);
            ui.label("Variations:");
            for (idx, variation) in shown.variations.iter().enumerate() {
                let is_playing = shown.playing == Some(variation.answer_id);
                let button = ui
                    .selectable_label(is_playing, format!("{}", idx + 1))
                    .on_hover_text(format!("Play answer {} again, note for note", idx + 1));
                if button.clicked() {
                    self.live.steer.send(Steer::Replay { answer_id: variation.answer_id });
                }
            }
            ui.add_space(12.0);
            if ui.add_enabled(shown.playing().is_some(), egui::Button::new("Save answer")).clicked() {
                self.message = self.save(shown);
            }
        });
    }

    fn save(&self, shown: &Shown) -> String {
        let Some(folder) = answers_folder() else {
            return "This system has no user data folder to save answers in.".into();
        };
        match save_answer(shown, self.live.steer.tempo_bpm(), &folder) {
            Ok(path) => format!("Saved the phrase and the answer to {}", path.display()),
            Err(err) => format!("Could not save: {err}"),
        }
    }

    /// The preset list with Load and Save, and the model picker.
    fn presets_and_model(&mut self, ui: &mut Ui, context: &GuiContext, setter: &ParamSetter) {
        ui.horizontal(|ui| {
            ui.label("Preset:");
            let selected =
                self.preset_idx.and_then(|idx| self.presets.get(idx)).map_or("Choose…".into(), preset_label);
            egui::ComboBox::from_id_salt("preset").selected_text(selected).width(200.0).show_ui(ui, |ui| {
                for (idx, listed) in self.presets.iter().enumerate() {
                    let label = ui.selectable_value(&mut self.preset_idx, Some(idx), preset_label(listed));
                    if let Ok(preset) = &listed.1 {
                        label.on_hover_text(&preset.description);
                    }
                }
            });
            if ui.button("Load").clicked() {
                self.message = self.load_preset(context);
            }
            ui.add(egui::TextEdit::singleline(&mut self.preset_name).hint_text("name").desired_width(120.0));
            if ui.button("Save preset").clicked() {
                self.message = self.save_preset();
            }
        });
        ui.horizontal(|ui| {
            ui.label("Model:");
            let library = self.params.model.library();
            let current = self.params.model_choice.model_select.value().max(0) as usize;
            let name = self.params.model.slot_name(current);
            egui::ComboBox::from_id_salt("model").selected_text(name).width(200.0).show_ui(ui, |ui| {
                for slot in 0..=library.models.len() {
                    let label = self.params.model.slot_name(slot);
                    if ui.selectable_label(slot == current, label).clicked() {
                        setter.begin_set_parameter(&self.params.model_choice.model_select);
                        setter.set_parameter(&self.params.model_choice.model_select, slot as i32);
                        setter.end_set_parameter(&self.params.model_choice.model_select);
                    }
                }
            });
            ui.add(
                egui::TextEdit::singleline(&mut self.model_folder)
                    .hint_text("a model folder (config.json + model.safetensors)")
                    .desired_width(280.0),
            );
            if ui.button("Use folder").clicked() {
                self.message = self.use_model_folder(setter);
            }
            if let Some(folder) = &library.folder {
                ui.label(format!("Models folder: {}", folder.display()));
            }
        });
    }

    fn load_preset(&self, context: &GuiContext) -> String {
        let Some((origin, preset)) = self.preset_idx.and_then(|idx| self.presets.get(idx)) else {
            return "Choose a preset first.".into();
        };
        let file = match origin {
            PresetOrigin::Factory => "factory".to_string(),
            PresetOrigin::User(path) => path.display().to_string(),
        };
        match preset
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|p| p.apply(&self.params, context, &file).map(|()| p))
        {
            Ok(preset) => format!("Loaded {}: {}", preset.name, preset.description),
            Err(err) => err.to_string(),
        }
    }

    fn save_preset(&mut self) -> String {
        let name = self.preset_name.trim();
        if name.is_empty() {
            return "Type a name for the preset first.".into();
        }
        let Some(folder) = presets::user_presets_folder() else {
            return "This system has no user data folder to keep presets in.".into();
        };
        let preset = Preset::capture(&self.params, name, "Saved from the editor");
        match presets::save(&preset, &folder) {
            Ok(path) => {
                self.presets = presets::list(Some(&folder));
                self.preset_idx =
                    self.presets.iter().position(|(origin, _)| origin == &PresetOrigin::User(path.clone()));
                format!("Saved preset {}", path.display())
            }
            Err(err) => err.to_string(),
        }
    }

    fn use_model_folder(&self, setter: &ParamSetter) -> String {
        let path = PathBuf::from(self.model_folder.trim());
        let choice = ModelSource::Dir(path.clone());
        if let Err(reason) = choice.validate() {
            return format!("{} cannot be used: {reason}", path.display());
        }
        self.params.model.set(choice);
        // The Model parameter's 0 defers to the saved choice, which is now this folder.
        setter.begin_set_parameter(&self.params.model_choice.model_select);
        setter.set_parameter(&self.params.model_choice.model_select, 0);
        setter.end_set_parameter(&self.params.model_choice.model_select);
        format!("Loading {} (the status line says when it answers)", path.display())
    }
}

fn preset_label(listed: &Listed) -> String {
    match listed {
        (PresetOrigin::Factory, Ok(preset)) => preset.name.clone(),
        (PresetOrigin::User(_), Ok(preset)) => format!("{} (yours)", preset.name),
        (_, Err(err)) => format!("Unusable: {err}"),
    }
}

/// Draws the phrase, the answer after it and the playhead, with bar and beat lines. Notes of
/// the answer not yet reached by the playhead are drawn hollow: they may still change.
fn piano_roll(ui: &mut Ui, shown: &Shown, playhead_beats: Option<f64>, answer_bars: f64) {
    let size = Vec2::new(ui.available_width(), 260.0);
    let (response, painter) = ui.allocate_painter(size, Sense::hover());
    let rect = response.rect;
    painter.rect_filled(rect, 3.0, ROLL_BACKGROUND);
    let Some(phrase) = &shown.phrase else {
        painter.text(
            rect.center(),
            Align2::CENTER_CENTER,
            "The phrase you play and the answer appear here",
            FontId::proportional(16.0),
            Color32::GRAY,
        );
        return;
    };
    let answer = shown.playing();
    let answer_notes: &[Note] = answer.map_or(&[], |a| &a.notes);
    let answer_len = answer.map_or(0.0, |a| a.written_until_beats).max(answer_bars * phrase.bar_beats);
    let total_beats = (phrase.len_beats + answer_len).max(phrase.bar_beats);
    let pitches = phrase.notes.iter().chain(answer_notes).map(|n| n.pitch);
    let (low, high) = pitches.fold((u8::MAX, 0u8), |(lo, hi), p| (lo.min(p), hi.max(p)));
    let (low, high) =
        if low > high { (60, 72) } else { (low.saturating_sub(2), high.saturating_add(2).min(127)) };
    let (low, high) = (low.min(high.saturating_sub(23)), high.max(low + 23).min(127));
    let rows = f32::from(high - low + 1);
    let row_height = rect.height() / rows;
    let x_of = |beats: f64| rect.left() + (beats / total_beats) as f32 * rect.width();
    let y_of = |pitch: u8| rect.bottom() - f32::from(pitch - low + 1) * row_height;

    for pitch in low..=high {
        if matches!(pitch % 12, 1 | 3 | 6 | 8 | 10) {
            let row =
                Rect::from_min_size(Pos2::new(rect.left(), y_of(pitch)), Vec2::new(rect.width(), row_height));
            painter.rect_filled(row, 0.0, BLACK_KEY_ROW);
        }
    }
    let bar_beats = phrase.bar_beats.max(0.25);
    let beat_beats = phrase.meter.map_or(1.0, |m| 4.0 / f64::from(m.denominator));
    let mut beat = 0.0;
    while beat <= total_beats + 1e-9 {
        let is_bar = (beat / bar_beats - (beat / bar_beats).round()).abs() < 1e-6;
        let stroke = if is_bar {
            Stroke::new(1.0, Color32::from_gray(95))
        } else {
            Stroke::new(1.0, Color32::from_gray(50))
        };
        painter
            .line_segment([Pos2::new(x_of(beat), rect.top()), Pos2::new(x_of(beat), rect.bottom())], stroke);
        beat += beat_beats;
    }
    let boundary = x_of(phrase.len_beats);
    painter.line_segment(
        [Pos2::new(boundary, rect.top()), Pos2::new(boundary, rect.bottom())],
        Stroke::new(2.0, Color32::from_gray(160)),
    );
    painter.text(
        Pos2::new(rect.left() + 4.0, rect.top() + 2.0),
        Align2::LEFT_TOP,
        "phrase",
        FontId::proportional(12.0),
        PHRASE_COLOR,
    );
    painter.text(
        Pos2::new(boundary + 4.0, rect.top() + 2.0),
        Align2::LEFT_TOP,
        "answer",
        FontId::proportional(12.0),
        ANSWER_COLOR,
    );

    let note_rect = |note: &Note, offset: f64| {
        let (x0, x1) = (x_of(note.start_beats + offset), x_of(note.start_beats + offset + note.len_beats));
        Rect::from_min_max(
            Pos2::new(x0, y_of(note.pitch) + 1.0),
            Pos2::new(x1.max(x0 + 2.0), y_of(note.pitch) + row_height - 1.0),
        )
    };
    for note in &phrase.notes {
        painter.rect_filled(note_rect(note, 0.0), 2.0, PHRASE_COLOR);
    }
    let playhead = playhead_beats.unwrap_or(f64::INFINITY);
    for note in answer_notes {
        let r = note_rect(note, phrase.len_beats);
        if note.start_beats > playhead {
            // Written ahead of the playhead: a temperature change still reaches notes after it.
            painter.rect_stroke(r, 2.0, Stroke::new(1.5, ANSWER_COLOR), StrokeKind::Inside);
        } else if note.start_beats + note.len_beats > playhead {
            painter.rect_filled(r, 2.0, Color32::from_rgb(255, 220, 120));
        } else {
            painter.rect_filled(r, 2.0, ANSWER_COLOR);
        }
    }
    if let Some(beats) = playhead_beats.filter(|b| *b >= 0.0) {
        let x = x_of(phrase.len_beats + beats);
        painter.line_segment(
            [Pos2::new(x, rect.top()), Pos2::new(x, rect.bottom())],
            Stroke::new(2.0, PLAYHEAD_COLOR),
        );
    }
}

/// Every parameter in the four groups the host sees too (`params::AntiphonParams`), with the
/// values the host shows.
fn parameter_groups(ui: &mut Ui, params: &AntiphonParams, setter: &ParamSetter) {
    let (listen, answer, sound, choice) =
        (&params.listen, &params.answer, &params.sound, &params.model_choice);
    let groups: [(&str, Vec<&dyn ParamRow>); 4] = [
        (
            "Listen",
            vec![
                &listen.trigger,
                &listen.silence_beats,
                &listen.phrase_bars,
                &listen.pass_through,
                &listen.free_tempo_bpm,
            ],
        ),
        (
            "Answer",
            vec![
                &answer.temperature,
                &answer.answer_start,
                &answer.answer_bars,
                &answer.should_yield,
                &answer.is_continuous,
                &answer.texture,
                &answer.max_voices,
            ],
        ),
        (
            "Sound",
            vec![
                &sound.key_lock,
                &sound.key_root,
                &sound.scale,
                &sound.lowest_note,
                &sound.highest_note,
                &sound.velocity_mode,
                &sound.velocity,
                &sound.gate_percent,
                &sound.channel,
            ],
        ),
        ("Model", vec![&choice.model_select, &choice.device, &choice.seed, &choice.is_fresh_seed]),
    ];
    ui.columns(groups.len(), |columns| {
        for (column, (title, rows)) in columns.iter_mut().zip(groups) {
            column.strong(title);
            egui::Grid::new(title).num_columns(2).spacing([6.0, 4.0]).show(column, |ui| {
                for row in rows {
                    row.row(ui, setter);
                    ui.end_row();
                }
            });
        }
    });
}

/// A parameter drawn as a name and a slider.
trait ParamRow {
    fn row(&self, ui: &mut Ui, setter: &ParamSetter);
}

impl<P: Param> ParamRow for P {
    fn row(&self, ui: &mut Ui, setter: &ParamSetter) {
        ui.label(self.name());
        ui.add(ParamSlider::for_param(self, setter).with_width(64.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every character the editor's code writes (its labels, and the messages of the presets
    /// and the worker it shows) has a glyph in the one font it installs, so none is drawn as a
    /// box. Comments are left out; what a user types or names is not checked.
    #[test]
    fn the_editors_font_draws_every_character_its_code_writes() {
        let sources = [
            ("src/editor.rs", include_str!("editor.rs")),
            ("src/presets.rs", include_str!("presets.rs")),
            ("src/engine/view.rs", include_str!("engine/view.rs")),
            ("src/engine/worker.rs", include_str!("engine/worker.rs")),
        ];
        let mut fonts = egui::epaint::Fonts::new(egui::epaint::TextOptions::default(), fonts());
        let mut view = fonts.with_pixels_per_point(1.0);
        for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
            let font = FontId::new(14.0, family);
            for (path, source) in sources {
                for (number, line) in source.lines().enumerate() {
                    let code = line.trim_start();
                    if code.starts_with("//") {
                        continue;
                    }
                    let missing: String =
                        code.chars().filter(|&c| !c.is_control() && !view.has_glyph(&font, c)).collect();
                    assert!(
                        missing.is_empty(),
                        "{path}:{}: no glyph for {missing:?} in {font:?}",
                        number + 1
                    );
                }
            }
        }
    }
}
