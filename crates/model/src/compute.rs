//! Where a model runs: the CPU, or a GPU when the build has one and it is faster. The choice
//! is the user's (CPU, GPU) or measured on the model loaded (Auto).
//! Runs on: the worker thread (plugin loads) and offline threads (xtask). Never on the audio
//! thread: opening a GPU and timing steps take milliseconds.

use std::time::{Duration, Instant};

use candle_core::Device;

use crate::ModelError;

/// Which device a model should run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The faster of the CPU and the GPU for the model loaded, timed when it loads; the CPU
    /// where there is no GPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first GPU; the CPU when there is none or it fails.
    Gpu,
}

/// Whether this build can run a model on a GPU at all (features `cuda` or `metal`).
pub const HAS_GPU_SUPPORT: bool = cfg!(any(feature = "cuda", feature = "metal"));

/// Steps run before timing, so the first call's setup (kernel compilation, caches) is not timed.
const WARMUP_STEPS: usize = 4;

/// Steps timed for each device.
const TIMED_STEPS: usize = 24;

/// The first GPU this build can use: CUDA's first device (feature `cuda`), else Metal's
/// (feature `metal`). The error says why there is none, for the user to read.
pub fn first_gpu() -> Result<Device, String> {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(device) => return Ok(device),
            Err(err) if !cfg!(feature = "metal") => {
                return Err(format!("no CUDA GPU could be opened: {}", crate::candle_message(&err)))
            }
            Err(_) => {}
        }
    }
    #[cfg(feature = "metal")]
    {
        return Device::new_metal(0)
            .map_err(|err| format!("no Metal GPU could be opened: {}", crate::candle_message(&err)));
    }
    #[allow(unreachable_code)]
    Err("this build has no GPU support (it was built without the cuda or metal feature)".to_string())
}

/// The PTX of the CUDA C `source`, compiled by NVRTC the first time a process asks and kept in
/// `cache`, or why NVRTC refused it (`what` names the kernels in the message).
#[cfg(feature = "cuda")]
pub fn ptx_once(
    cache: &'static std::sync::OnceLock<Result<String, String>>,
    source: &str,
    what: &str,
) -> candle_core::Result<&'static str> {
    use candle_core::cuda_backend::cudarc::nvrtc;
    cache
        .get_or_init(|| nvrtc::compile_ptx(source).map(|ptx| ptx.to_src()).map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("{what} did not compile: {e}")))
}

/// A short name of `device` for messages: "CPU", "CUDA GPU" or "Metal GPU".
pub fn device_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "CPU",
        Device::Cuda(_) => "CUDA GPU",
        Device::Metal(_) => "Metal GPU",
    }
}

/// The mean time of one call of `step`, after a few untimed calls.
pub fn time_per_step(mut step: impl FnMut() -> Result<(), ModelError>) -> Result<Duration, ModelError> {
    for _ in 0..WARMUP_STEPS {
        step()?;
    }
    let start = Instant::now();
    for _ in 0..TIMED_STEPS {
        step()?;
    }
    Ok(start.elapsed() / TIMED_STEPS as u32)
}

/// A model placed on a device, and why there, for the status line and the log.
#[derive(Debug)]
pub struct Placed<M> {
    /// The model.
    pub model: M,
    /// Where it runs and why, e.g. "CPU (no GPU: ...)" or "CUDA GPU (Auto: 41 µs a step
    /// against the CPU's 180 µs)".
    pub placement: String,
    /// The model loaded on the CPU as well, when `model` runs on a GPU: it takes over if the
    /// GPU fails later.
    pub cpu_standby: Option<M>,
}

/// Loads a model where `choice` says, with `load` (which loads it on the device it is given)
/// and `time_step` (which times one generation step of a loaded model, see [`time_per_step`]).
/// The CPU model is always loaded first: its failure is the model's failure, and it is what a
/// missing or failing GPU falls back to. Errors only when the CPU load fails.
pub fn place<M>(
    choice: DeviceChoice,
    load: impl Fn(&Device) -> Result<M, ModelError>,
    time_step: impl Fn(&M) -> Result<Duration, ModelError>,
) -> Result<Placed<M>, ModelError> {
    place_with_gpu(choice, first_gpu, load, time_step)
}

/// [`place`] with the GPU opened by `open_gpu` (tests pass one that fails or stands in).
fn place_with_gpu<M>(
    choice: DeviceChoice,
    open_gpu: impl FnOnce() -> Result<Device, String>,
    load: impl Fn(&Device) -> Result<M, ModelError>,
    time_step: impl Fn(&M) -> Result<Duration, ModelError>,
) -> Result<Placed<M>, ModelError> {
    let cpu = load(&Device::Cpu)?;
    let on_cpu =
        |model: M, why: String| Ok(Placed { model, placement: format!("CPU ({why})"), cpu_standby: None });
    if choice == DeviceChoice::Cpu {
        return on_cpu(cpu, "chosen".into());
    }
    let device = match open_gpu() {
        Ok(device) => device,
        // Auto in a build without GPU support has nothing to choose between.
        Err(_) if choice == DeviceChoice::Auto && !HAS_GPU_SUPPORT => {
            return Ok(Placed { model: cpu, placement: "CPU".into(), cpu_standby: None })
        }
        Err(reason) => return on_cpu(cpu, format!("no GPU: {reason}")),
    };
    let name = device_name(&device);
    let gpu = match load(&device) {
        Ok(model) => model,
        Err(err) => return on_cpu(cpu, format!("the model could not be loaded on the {name}: {err}")),
    };
    // A GPU that loads the model but fails its first steps (out of memory, busy, a driver
    // error) is no use either.
    let gpu_time = match time_step(&gpu) {
        Ok(time) => time,
        Err(err) => return on_cpu(cpu, format!("the {name} failed a step: {err}")),
    };
    if choice == DeviceChoice::Gpu {
        let placement = format!("{name} (chosen; {} a step)", micros(gpu_time));
        return Ok(Placed { model: gpu, placement, cpu_standby: Some(cpu) });
    }
    // A CPU step that fails is the model's own failure, met again when it answers.
    let cpu_time = time_step(&cpu).unwrap_or(Duration::MAX);
    let times = format!("{} a step against the CPU's {}", micros(gpu_time), micros(cpu_time));
    // Auto keeps the GPU only where its step is faster.
    if gpu_time < cpu_time {
        Ok(Placed { model: gpu, placement: format!("{name} (Auto: {times})"), cpu_standby: Some(cpu) })
    } else {
        on_cpu(cpu, format!("Auto: the {name} takes {times}"))
    }
}

/// `duration` in microseconds, as "41 µs".
fn micros(duration: Duration) -> String {
    format!("{:.0} µs", duration.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in model: the device it was loaded on and how long its step takes.
    struct Fake {
        on_cpu: bool,
        step: Duration,
    }

    fn load(gpu_step: Option<Duration>) -> impl Fn(&Device) -> Result<Fake, ModelError> {
        move |device| match (device.is_cpu(), gpu_step) {
            (true, _) => Ok(Fake { on_cpu: true, step: Duration::from_micros(20) }),
            (false, Some(step)) => Ok(Fake { on_cpu: false, step }),
            (false, None) => Err(ModelError::Device { name: "gpu".into(), reason: "out of memory".into() }),
        }
    }

    fn timed(model: &Fake) -> Result<Duration, ModelError> {
        Ok(model.step)
    }

    #[test]
    fn a_build_without_a_gpu_places_every_choice_on_the_cpu_and_says_why() {
        for choice in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Gpu] {
            let placed = place(choice, load(Some(Duration::from_micros(1))), timed).unwrap();
            if HAS_GPU_SUPPORT {
                // A GPU build on a machine where no GPU opens: the reason, on one line.
                if let (Err(reason), DeviceChoice::Gpu) = (first_gpu(), choice) {
                    assert_eq!(placed.placement, format!("CPU (no GPU: {reason})"));
                    assert!(!reason.contains('\n'), "{reason}");
                }
                continue;
            }
            assert!(placed.model.on_cpu, "{choice:?}");
            let expected = match choice {
                DeviceChoice::Auto => "CPU",
                DeviceChoice::Cpu => "CPU (chosen)",
                DeviceChoice::Gpu => {
                    "CPU (no GPU: this build has no GPU support (it was built without the cuda or metal feature))"
                }
            };
            assert_eq!(placed.placement, expected);
        }
    }

    #[test]
    fn a_gpu_that_cannot_load_or_step_falls_back_to_the_cpu_with_the_reason() {
        // Device::Cpu stands in for the GPU the opener hands over; `load` tells them apart by
        // the call order instead, so this test uses a loader that fails on the second load.
        let calls = std::cell::Cell::new(0);
        let fails_second = |_: &Device| {
            calls.set(calls.get() + 1);
            if calls.get() == 1 {
                Ok(Fake { on_cpu: true, step: Duration::from_micros(20) })
            } else {
                Err(ModelError::Device { name: "gpu".into(), reason: "out of memory".into() })
            }
        };
        let placed = place_with_gpu(DeviceChoice::Gpu, || Ok(Device::Cpu), fails_second, timed).unwrap();
        assert!(placed.model.on_cpu);
        assert!(
            placed.placement.contains("could not be loaded") && placed.placement.contains("out of memory")
        );

        let failing_step = |model: &Fake| {
            if model.on_cpu {
                Ok(model.step)
            } else {
                Err(ModelError::Device { name: "gpu".into(), reason: "device busy".into() })
            }
        };
        let calls = std::cell::Cell::new(0);
        let gpu_second = |_: &Device| {
            calls.set(calls.get() + 1);
            Ok(Fake { on_cpu: calls.get() == 1, step: Duration::from_micros(5) })
        };
        let placed =
            place_with_gpu(DeviceChoice::Auto, || Ok(Device::Cpu), gpu_second, failing_step).unwrap();
        assert!(placed.model.on_cpu);
        // The stand-in GPU is a CPU device, so the message names it "CPU".
        assert!(
            placed.placement.ends_with("failed a step: device 'gpu': device busy)"),
            "{}",
            placed.placement
        );
        let placed =
            place_with_gpu(DeviceChoice::Gpu, || Err("driver missing".into()), load(None), timed).unwrap();
        assert_eq!(placed.placement, "CPU (no GPU: driver missing)");
    }

    #[test]
    fn auto_keeps_the_faster_device_by_its_measured_step() {
        let second_is_gpu = |gpu_step: Duration| {
            let calls = std::cell::Cell::new(0);
            move |_: &Device| {
                calls.set(calls.get() + 1);
                let on_cpu = calls.get() == 1;
                Ok(Fake { on_cpu, step: if on_cpu { Duration::from_micros(20) } else { gpu_step } })
            }
        };
        let slow_gpu = place_with_gpu(
            DeviceChoice::Auto,
            || Ok(Device::Cpu),
            second_is_gpu(Duration::from_micros(90)),
            timed,
        )
        .unwrap();
        assert!(slow_gpu.model.on_cpu, "{}", slow_gpu.placement);
        assert!(
            slow_gpu.placement.contains("90 µs a step against the CPU's 20 µs"),
            "{}",
            slow_gpu.placement
        );
        let fast_gpu = place_with_gpu(
            DeviceChoice::Auto,
            || Ok(Device::Cpu),
            second_is_gpu(Duration::from_micros(8)),
            timed,
        )
        .unwrap();
        assert!(!fast_gpu.model.on_cpu, "{}", fast_gpu.placement);
        assert!(fast_gpu.cpu_standby.as_ref().is_some_and(|cpu| cpu.on_cpu), "the CPU copy stands by");
        let chosen = place_with_gpu(
            DeviceChoice::Gpu,
            || Ok(Device::Cpu),
            second_is_gpu(Duration::from_micros(90)),
            timed,
        )
        .unwrap();
        assert!(!chosen.model.on_cpu, "a chosen GPU is kept even when slower: {}", chosen.placement);
    }

    #[test]
    fn time_per_step_runs_warmup_and_timed_steps_and_passes_errors_on() {
        let mut calls = 0;
        time_per_step(|| {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, WARMUP_STEPS + TIMED_STEPS);
        let err = time_per_step(|| Err(ModelError::Device { name: "gpu".into(), reason: "lost".into() }));
        assert!(err.unwrap_err().to_string().contains("lost"));
    }

    /// On a GPU (feature `cuda`; run by `scripts/gpu-check.sh` on a machine with one): the
    /// built-in model's step on the GPU writes the logits the CPU's f32 step writes, and a
    /// chosen GPU is kept.
    #[cfg(feature = "cuda")]
    #[test]
    fn the_built_in_model_steps_alike_on_the_gpu_and_the_cpu() {
        use crate::io::{LoadedModel, ModelSource};
        use music::TokenId;
        let gpu = first_gpu().expect("this test needs a GPU");
        let on_gpu = LoadedModel::load_on(&ModelSource::Builtin, &gpu).unwrap();
        let on_cpu = LoadedModel::load_on(&ModelSource::Builtin, &Device::Cpu).unwrap();
        let weights = on_cpu.lstm.step_weights().unwrap().without_fast_step();
        let vocab = on_cpu.config.vocab.len();
        let (mut gpu_state, mut cpu_state) = (on_gpu.new_state(), on_cpu.new_state());
        let (mut gpu_logits, mut cpu_logits) = (vec![0.0f32; vocab], vec![0.0f32; vocab]);
        for idx in 0..32u16 {
            let token = TokenId(idx % vocab as u16);
            on_gpu.step(token, &mut gpu_state, &mut gpu_logits).unwrap();
            on_cpu.lstm.step(&weights, token, &[], &mut cpu_state, &mut cpu_logits).unwrap();
            let worst = gpu_logits.iter().zip(&cpu_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-3, "step {idx}: logits differ by {worst}");
        }
        let placed = place(
            DeviceChoice::Gpu,
            |device| LoadedModel::load_on(&ModelSource::Builtin, device),
            |model| {
                let mut state = model.new_state();
                let mut logits = vec![0.0f32; vocab];
                time_per_step(|| model.step(TokenId(0), &mut state, &mut logits))
            },
        )
        .unwrap();
        assert!(!placed.model.lstm.device().is_cpu(), "{}", placed.placement);
        println!("GPU chosen: {}", placed.placement);
    }
}
