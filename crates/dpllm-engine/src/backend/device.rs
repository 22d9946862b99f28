//! Choosing a backend by name: `cpu`, `cuda`, `cuda:N`.

use std::fmt;
use std::str::FromStr;

use crate::error::EngineError;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU backend.
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Device, EngineError> {
        let bad = || EngineError::Device(format!("unknown device {s:?}: use cpu, cuda or cuda:N"));
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Device::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Ok when this build has the device's backend (the CUDA backend is the
    /// `cuda` feature, on by default); whether a GPU is there is found when the
    /// backend opens it.
    pub fn check(self) -> Result<(), EngineError> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
            Device::Cuda(_) => Err(EngineError::Device(format!(
                "{self}: this dpllm was built without the CUDA backend (cargo feature \
                 `cuda`); run with --device cpu"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_refuses_what_is_not_built() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA:1".parse::<Device>().unwrap(), Device::Cuda(1));
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        for bad in ["tpu", "cuda:x", "cuda:-1", ""] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
        assert!(Device::Cpu.check().is_ok());
        let cuda = Device::Cuda(0).check();
        assert_eq!(cuda.is_ok(), cfg!(feature = "cuda"));
        if let Err(e) = cuda {
            assert!(e.to_string().contains("--device cpu"), "{e}");
        }
    }
}
