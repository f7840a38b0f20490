//! `--device`: which engine runs a command (SPEC §1, §6).
//!
//! The CUDA driver is loaded at run time (cudarc's dynamic loading), and cudarc panics when a library is
//! missing, so the driver is probed — library present, `cuInit` succeeds, at least one device — before
//! any other CUDA call. `auto` falls back to the CPU with a one-line reason; an explicit `cuda` fails with it.

use crate::cli::Common;
use crate::error::input;
use anyhow::{Result, bail};

/// What the user asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    /// `cuda` (device 0), `cuda:N` or `cuda:N,M,…`.
    Cuda(Vec<usize>),
}

impl DeviceRequest {
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        match text {
            "auto" => return Ok(Self::Auto),
            "cpu" => return Ok(Self::Cpu),
            "cuda" | "gpu" => return Ok(Self::Cuda(vec![0])),
            _ => {}
        }
        let ordinals = text
            .strip_prefix("cuda:")
            .map(|list| list.split(',').map(|n| n.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>());
        match ordinals {
            Some(Ok(list)) if !list.is_empty() => {
                let mut unique = list.clone();
                unique.sort();
                unique.dedup();
                if unique.len() != list.len() {
                    return Err(input(format!("--device {text}: a GPU is listed twice")));
                }
                Ok(Self::Cuda(list))
            }
            _ => Err(input(format!("--device {text:?}: expected auto, cpu, cuda, cuda:N or cuda:N,M,…"))),
        }
    }
}

/// Where a command runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(Vec<usize>),
}

/// Probes the CUDA driver without letting cudarc panic: the number of devices, or why there is none.
pub fn probe_cuda() -> Result<usize, String> {
    let probed = std::panic::catch_unwind(|| {
        // SAFETY: only checks whether the driver library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no CUDA driver library (libcuda.so) was found".to_string());
        }
        cudarc::driver::result::init().map_err(|e| format!("the CUDA driver failed to initialise ({e:?})"))?;
        let count =
            cudarc::driver::result::device::get_count().map_err(|e| format!("cannot count CUDA devices ({e:?})"))?;
        if count <= 0 { Err("the CUDA driver reports no device".to_string()) } else { Ok(count as usize) }
    });
    probed.unwrap_or_else(|_| Err("the CUDA driver library is unusable (a required symbol is missing)".to_string()))
}

/// Resolves `--device` for a command. `cuda_engine` says whether this command has a CUDA engine in this
/// build; without one, `auto` uses the CPU and `cuda` is an error.
pub fn choose(common: &Common, command: &str, cuda_engine: bool) -> Result<Device> {
    let request = DeviceRequest::parse(&common.device)?;
    if request == DeviceRequest::Cpu {
        return Ok(Device::Cpu);
    }
    // With a CUDA engine, its libraries (cuBLAS, NVRTC) must open too, or `auto` would pick a GPU it cannot use.
    let probed = if cuda_engine { crate::cuda::probe() } else { probe_cuda() };
    let reason = match probed {
        Err(reason) => reason,
        Ok(_) if !cuda_engine => format!("`{command}` has no CUDA engine in this build"),
        Ok(count) => match request {
            DeviceRequest::Cuda(list) => {
                if let Some(bad) = list.iter().find(|&&n| n >= count) {
                    return Err(input(format!("--device: there is no cuda:{bad} ({count} device(s) found)")));
                }
                return Ok(Device::Cuda(list));
            }
            _ => return Ok(Device::Cuda(vec![0])),
        },
    };
    match request {
        DeviceRequest::Auto => {
            // Once per process: the demo runs several commands and one notice says it all.
            static NOTICED: std::sync::Once = std::sync::Once::new();
            NOTICED.call_once(|| common.notice(format!("note: running on the CPU: {reason}")));
            Ok(Device::Cpu)
        }
        _ => bail!("--device {}: {reason}", common.device),
    }
}

/// [`choose`] for a command whose CUDA engine can refuse a job (a model it does not implement, say):
/// `refused` says why, checked only when a GPU was chosen. `auto` then falls back to the CPU with a notice;
/// an explicit `--device cuda` is an error naming the reason.
pub fn choose_for_job(common: &Common, command: &str, refused: impl FnOnce() -> Result<()>) -> Result<Device> {
    let device = choose(common, command, true)?;
    if let Device::Cuda(_) = device
        && let Err(why) = refused()
    {
        if DeviceRequest::parse(&common.device)? == DeviceRequest::Auto {
            common.notice(format!("note: running on the CPU: {why:#}"));
            return Ok(Device::Cpu);
        }
        return Err(input(format!("--device {}: {why}", common.device)));
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse_or_name_the_problem() {
        assert_eq!(DeviceRequest::parse("auto").unwrap(), DeviceRequest::Auto);
        assert_eq!(DeviceRequest::parse("cpu").unwrap(), DeviceRequest::Cpu);
        assert_eq!(DeviceRequest::parse("cuda").unwrap(), DeviceRequest::Cuda(vec![0]));
        assert_eq!(DeviceRequest::parse("cuda:1,0").unwrap(), DeviceRequest::Cuda(vec![1, 0]));
        for bad in ["cuda:", "cuda:a", "cuda:1,1", "tpu"] {
            assert!(crate::error::is_input_error(&DeviceRequest::parse(bad).unwrap_err()), "{bad}");
        }
    }

    #[test]
    fn probing_never_panics() {
        // On a machine without a GPU this names the reason; with one it counts devices. Either way no panic.
        match probe_cuda() {
            Ok(n) => assert!(n > 0),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
}
