//! Kernel launches, optionally with programmatic dependent launch (PDL).
//!
//! With PDL (compute capability 9.0 and later) a kernel may start while the
//! kernel before it on the stream is still running: its blocks fill the
//! multiprocessors the earlier kernel's last wave leaves free, and do the
//! work that needs nothing from it (the GEMV fetches its first weights and
//! builds its tables) before `pdl_wait()` (`kernels/common.cuh`) holds them
//! until that kernel has finished. Every kernel of this backend calls
//! `pdl_wait()` before it reads what another kernel wrote or writes
//! anything, so any of them may be launched this way; on older GPUs the
//! calls compile to nothing and launches go through `cuLaunchKernel` as
//! before. It is on by default where the GPU has it: 8-10 % off the
//! 8B-shaped 3- and 4-bit decode on an H100 (`docs/benchmarks.md`);
//! `DPLLM_CUDA_PDL=0` (or [`super::CudaDevice::set_pdl`]) turns it off.

use std::ffi::c_void;

use cudarc::driver::{
    result, sys, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DriverError, LaunchConfig,
};

/// A kernel parameter: the bytes the driver copies for it (at most 8, at the
/// start of the slot, in the machine's byte order).
pub trait KernelArg {
    /// The parameter's value in a slot of 8 bytes.
    fn slot(&self, stream: &CudaStream) -> u64;
}

/// The slot of a scalar whose bytes (native order, at most 8) are `v`.
fn scalar_slot(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..v.len()].copy_from_slice(v);
    u64::from_ne_bytes(b)
}

macro_rules! scalar_arg {
    ($($t:ty),+) => {$(
        impl KernelArg for $t {
            fn slot(&self, _: &CudaStream) -> u64 {
                scalar_slot(&self.to_ne_bytes())
            }
        }
    )+};
}
scalar_arg!(i32, u32, i64, u64, f32);

impl<T> KernelArg for CudaSlice<T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for CudaView<'_, T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for CudaViewMut<'_, T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

/// One launch of a kernel on a stream, its parameters pushed in order.
pub struct Launch<'a> {
    func: &'a CudaFunction,
    stream: &'a CudaStream,
    pdl: bool,
    args: Vec<u64>,
}

impl<'a> Launch<'a> {
    /// A launch of `func` on `stream`, with PDL when `pdl`.
    pub fn new(func: &'a CudaFunction, stream: &'a CudaStream, pdl: bool) -> Launch<'a> {
        Launch {
            func,
            stream,
            pdl,
            args: Vec::with_capacity(24),
        }
    }

    /// Push the next parameter.
    pub fn arg<A: KernelArg + ?Sized>(&mut self, a: &A) -> &mut Self {
        self.args.push(a.slot(self.stream));
        self
    }

    /// Queue the kernel.
    ///
    /// # Safety
    /// The parameters must match the kernel's in number, order and C type
    /// (pointers as buffers, `int` as `i32`, ...), the grid and buffers must
    /// cover what it reads and writes, and a kernel launched with PDL must
    /// call `pdl_wait()` before it touches memory another kernel writes.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        let mut params: Vec<*mut c_void> = (self.args.iter_mut())
            .map(|a| a as *mut u64 as *mut c_void)
            .collect();
        if !self.pdl {
            return result::launch_kernel(
                self.func.cu_function(),
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                &mut params,
            );
        }
        // SAFETY: a plain C union of integers; all zeros is a valid value.
        let mut value: sys::CUlaunchAttributeValue = std::mem::zeroed();
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        sys::cuLaunchKernelEx(
            &config,
            self.func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
    }
}

#[cfg(test)]
mod tests {
    use super::scalar_slot;

    #[test]
    fn scalar_slots_hold_the_value_bytes_first() {
        let b = scalar_slot(&(-2i32).to_ne_bytes()).to_ne_bytes();
        assert_eq!(i32::from_ne_bytes(b[..4].try_into().unwrap()), -2);
        assert_eq!(b[4..], [0; 4]);
        let b = scalar_slot(&1.5f32.to_ne_bytes()).to_ne_bytes();
        assert_eq!(f32::from_ne_bytes(b[..4].try_into().unwrap()), 1.5);
        assert_eq!(scalar_slot(&(-7i64).to_ne_bytes()), (-7i64) as u64);
    }
}
