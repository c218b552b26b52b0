//! The fast paths' promises that are not about speed itself: generation allocates nothing per
//! symbol once running (counted per thread by the allocation guard the plugin's debug builds
//! install, installed here as this test binary's allocator).

use std::sync::Arc;

use antiphon_model::{Generator, InputKind, LoadedModel, MelodyLstm, ModelConfig, SamplingSettings};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use music::{bar, Meter, Vocab};
use nice_assert_no_alloc::{assert_no_alloc, reset_violation_count, violation_count};

/// Counts allocations inside `assert_no_alloc` scopes (outside them it only passes them on).
#[global_allocator]
static ALLOCATOR: nice_assert_no_alloc::AllocDisabler = nice_assert_no_alloc::AllocDisabler;

/// Allocations `f` makes on this thread (the guard counts them rather than aborting).
fn allocations_during(f: impl FnOnce()) -> usize {
    reset_violation_count();
    assert_no_alloc(f);
    violation_count() as usize
}

/// A seeded model with fixed weights, so its steps run on the packed path; with `bar_inputs`
/// (bars of lookback, classes of repeat), one that reads bar positions and those.
fn model(
    input: InputKind,
    hidden: usize,
    layers: usize,
    bar_inputs: Option<(usize, usize)>,
) -> Arc<LoadedModel> {
    let mut config = ModelConfig::new(Vocab::for_pitch_range(48, 88), input, hidden, layers, 0.0);
    if let Some((bars, repeats)) = bar_inputs {
        config.bar_meters = bar::COMMON_METERS.to_vec();
        config.bar_lookback = bars;
        config.repeat_classes = repeats;
    }
    let tensors = MelodyLstm::initial_tensors(&config, 3, &Device::Cpu).unwrap();
    let lstm = MelodyLstm::new(&config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
    Arc::new(LoadedModel::new(config, lstm, "test").unwrap())
}

#[test]
fn generating_a_symbol_allocates_nothing() {
    let cases = [
        (InputKind::Embedding { dim: 16 }, 64, 2, None),
        (InputKind::OneHot, 40, 1, None),
        (InputKind::Embedding { dim: 16 }, 64, 2, Some((2, 0))),
        (InputKind::Embedding { dim: 16 }, 64, 2, Some((4, 0))),
        (InputKind::Embedding { dim: 16 }, 64, 2, Some((4, 4))),
    ];
    let settings = [
        SamplingSettings { may_end: false, ..Default::default() },
        SamplingSettings { temperature: 0.7, top_k: 5, may_end: false, ..Default::default() },
        SamplingSettings { temperature: 1.3, top_p: 0.9, may_end: false, ..Default::default() },
    ];
    for (input, hidden, layers, bar_inputs) in cases {
        let mut generator = Generator::new(model(input, hidden, layers, bar_inputs), 9);
        // In 3/4, so every step reads its bar position and the steps a bar, two... back, and
        // looks for repeats.
        generator.set_bar(Meter { numerator: 3, denominator: 4 }, 0);
        // The sampler's scratch buffer grows to the vocabulary on the first draw.
        generator.next_symbol(&settings[0]).unwrap();
        let mut num_symbols = 0;
        let num_allocs = allocations_during(|| {
            for i in 0..300 {
                num_symbols += generator.next_symbol(&settings[i % 3]).unwrap().is_some() as usize;
            }
        });
        assert_eq!(num_symbols, 300);
        assert_eq!(
            num_allocs, 0,
            "{input:?} {hidden}×{layers}, bar inputs {bar_inputs:?}: {num_allocs} allocations in 300 symbols"
        );
    }
}

#[test]
fn generating_with_the_tune_memory_allocates_nothing() {
    // The built-in model mixes its memory into every step: the lookup and the mixing must not
    // allocate either.
    let model = Arc::new(LoadedModel::builtin().unwrap());
    assert!(model.memory.is_some(), "the built-in model ships its tune memory");
    let mut generator = Generator::new(model, 9);
    generator.set_bar(Meter { numerator: 4, denominator: 4 }, 0);
    let settings = SamplingSettings { temperature: 0.9, may_end: false, ..Default::default() };
    generator.next_symbol(&settings).unwrap();
    let mut num_symbols = 0;
    let num_allocs = allocations_during(|| {
        for _ in 0..300 {
            num_symbols += generator.next_symbol(&settings).unwrap().is_some() as usize;
        }
    });
    assert_eq!((num_symbols, num_allocs), (300, 0));
}

#[test]
fn the_counter_sees_allocations() {
    let n = allocations_during(|| {
        std::hint::black_box(vec![1u8; 100]);
    });
    // An allocation and its release.
    assert_eq!(n, 2);
}
