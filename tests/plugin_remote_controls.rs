//! The device-panel pages a host with CLAP remote controls shows (Bitwig maps its controllers
//! to them), read through a real CLAP host: the first page holds the eight parameters a player
//! reaches for first, and every page names only parameters that exist, each once. Needs
//! `cargo xtask bundle antiphon` first.

mod plugin_host;

use std::collections::HashSet;

use plugin_host::Plugin;

#[test]
fn remote_control_pages_name_existing_parameters() {
    let plugin = Plugin::load();
    let pages = plugin.remote_control_pages();
    let names: Vec<&str> = pages.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["Play", "Answer", "Texture, Key and Model", "Clock and Device"]);
    let id_of = |name: &str| plugin.param(name).id;
    let play = [
        "Temperature",
        "Answer Length",
        "Trigger",
        "Silence",
        "Yield",
        "Continuous",
        "Key Lock",
        "MIDI Thru",
    ];
    assert_eq!(pages[0].1, play.map(id_of).to_vec(), "the first page");
    let ids: HashSet<u32> = plugin.param_names().iter().map(|name| id_of(name)).collect();
    let mut seen = HashSet::new();
    for (page, page_ids) in &pages {
        assert!(page_ids.len() <= 8, "{page}: more than eight controls");
        for id in page_ids {
            assert!(ids.contains(id), "{page}: parameter id {id} does not exist");
            assert!(seen.insert(*id), "{page}: parameter id {id} is on two pages");
        }
    }
    // Every parameter a player may want on a controller is on a page; only Bypass is not.
    let missing: Vec<String> =
        plugin.param_names().into_iter().filter(|name| !seen.contains(&id_of(name))).collect();
    assert_eq!(missing, ["Bypass"]);
}

#[test]
fn every_parameter_but_bypass_and_answer_now_is_in_a_named_group() {
    let plugin = Plugin::load();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for name in plugin.param_names() {
        let module = plugin.param(&name).module.clone();
        match groups.iter_mut().find(|(group, _)| *group == module) {
            Some((_, names)) => names.push(name),
            None => groups.push((module, vec![name])),
        }
    }
    groups.sort();
    let ungrouped = groups.iter().find(|(group, _)| group.is_empty()).map(|(_, names)| names.clone());
    let mut ungrouped = ungrouped.unwrap_or_default();
    ungrouped.sort();
    assert_eq!(ungrouped, vec!["Answer Now", "Bypass"]);
    let names: Vec<&str> = groups.iter().map(|(group, _)| group.as_str()).filter(|g| !g.is_empty()).collect();
    assert_eq!(names, vec!["Answer", "Listen", "Model", "Sound"]);
    let temperature_group = &plugin.param("Temperature").module;
    assert_eq!(temperature_group, "Answer");
}
