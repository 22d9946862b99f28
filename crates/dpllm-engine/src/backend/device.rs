//! Choosing a backend by name (`cpu`, `cuda`, `cuda:N`) and the element type
//! of its KV cache (`f32`, `f16`).

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

/// How a backend stores its KV cache. The CPU keeps f32; the CUDA backend f16
/// by default (half the memory and half what attention reads per token, as
/// llama.cpp and vLLM do), or f32 where GPU results must match the CPU's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// IEEE half precision, rounded to nearest on the way in; attention computes in f32.
    F16,
}

impl KvDtype {
    /// Bytes of one stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    /// `x` as the cache stores it.
    pub fn round(self, x: f32) -> f32 {
        match self {
            KvDtype::F32 => x,
            KvDtype::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
}

impl FromStr for KvDtype {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<KvDtype, EngineError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            _ => Err(EngineError::Device(format!(
                "unknown KV cache type {s:?}: use f32 or f16"
            ))),
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        })
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

    #[test]
    fn kv_types_parse_and_round() {
        assert_eq!("F16".parse::<KvDtype>().unwrap(), KvDtype::F16);
        assert_eq!("f32".parse::<KvDtype>().unwrap(), KvDtype::F32);
        let e = "bf16".parse::<KvDtype>().unwrap_err().to_string();
        assert!(e.contains("f32 or f16"), "{e}");
        assert_eq!(KvDtype::F16.to_string(), "f16");
        assert_eq!([KvDtype::F32.bytes(), KvDtype::F16.bytes()], [4, 2]);
        let x = 0.1f32;
        assert_eq!(KvDtype::F32.round(x), x);
        let r = KvDtype::F16.round(x);
        assert!(r != x && (r - x).abs() <= x * 2f32.powi(-11), "{r}");
        assert_eq!(KvDtype::F16.round(r), r);
    }
}
