//! NVRTC, the CUDA runtime compiler, through the handful of its C functions the engine needs.
//!
//! Opened by [`super::libs`] rather than through cudarc's bindings, which look for fixed library names and
//! panic when none loads (see there). Every function is resolved when the library is opened, so a library
//! that lacks one is an error then, not a crash later.

use super::libs::{self, Loaded};
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

type Program = *mut c_void;
type Status = c_int;

/// What a compilation produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// PTX for `compute_XY` (virtual architecture XY): loadable on any GPU of that architecture or newer,
    /// and what the test suite checks for 70 (V100) and 90 (H100).
    Ptx(u32),
    /// Machine code (CUBIN) for `sm_XY`: what the engine loads, compiled for the device it runs on, so no
    /// PTX has to be understood by the installed driver.
    Cubin(u32),
}

impl Target {
    pub fn arch(self) -> u32 {
        match self {
            Target::Ptx(a) | Target::Cubin(a) => a,
        }
    }

    fn option(self) -> String {
        match self {
            Target::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
            Target::Cubin(a) => format!("--gpu-architecture=sm_{a}"),
        }
    }

    pub fn describe(self) -> String {
        match self {
            Target::Ptx(a) => format!("compute_{a} PTX"),
            Target::Cubin(a) => format!("sm_{a} CUBIN"),
        }
    }
}

/// The output of one compilation and the compiler's messages (warnings, `--ptxas-options=-v` reports).
pub struct Compiled {
    pub code: Vec<u8>,
    pub log: String,
}

struct Api {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status,
    num_archs: unsafe extern "C" fn(*mut c_int) -> Status,
    archs: unsafe extern "C" fn(*mut c_int) -> Status,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut Program) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
}

/// An opened NVRTC library.
pub struct Nvrtc {
    api: Api,
    /// Where it was found.
    pub path: String,
    /// (major, minor) of the CUDA release it belongs to.
    pub version: (i32, i32),
    _loaded: Loaded,
}

/// The process-wide NVRTC, opened on first use; the error says where it was looked for.
pub fn get() -> Result<&'static Nvrtc, String> {
    static NVRTC: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
    NVRTC.get_or_init(|| Nvrtc::open(libs::open("nvrtc")?)).as_ref().map_err(Clone::clone)
}

/// The NVRTC in `dir` alone, beside the process-wide one: for checking the kernels with another CUDA release.
pub fn open_from(dir: &std::path::Path) -> Result<Nvrtc, String> {
    Nvrtc::open(libs::open_from(dir, "nvrtc")?)
}

macro_rules! symbol {
    ($lib:expr, $path:expr, $name:literal) => {
        // SAFETY: the type on the left of each binding is the documented C signature of that NVRTC function.
        *unsafe { $lib.get(concat!($name, "\0").as_bytes()) }
            .map_err(|e| format!("{}: has no {} ({e})", $path, $name))?
    };
}

impl Nvrtc {
    fn open(loaded: Loaded) -> Result<Self, String> {
        let (lib, path) = (&loaded.library, &loaded.path);
        let api = Api {
            version: symbol!(lib, path, "nvrtcVersion"),
            num_archs: symbol!(lib, path, "nvrtcGetNumSupportedArchs"),
            archs: symbol!(lib, path, "nvrtcGetSupportedArchs"),
            create: symbol!(lib, path, "nvrtcCreateProgram"),
            compile: symbol!(lib, path, "nvrtcCompileProgram"),
            log_size: symbol!(lib, path, "nvrtcGetProgramLogSize"),
            log: symbol!(lib, path, "nvrtcGetProgramLog"),
            ptx_size: symbol!(lib, path, "nvrtcGetPTXSize"),
            ptx: symbol!(lib, path, "nvrtcGetPTX"),
            cubin_size: symbol!(lib, path, "nvrtcGetCUBINSize"),
            cubin: symbol!(lib, path, "nvrtcGetCUBIN"),
            destroy: symbol!(lib, path, "nvrtcDestroyProgram"),
            error_string: symbol!(lib, path, "nvrtcGetErrorString"),
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let status = unsafe { (api.version)(&mut major, &mut minor) };
        if status != 0 {
            return Err(format!("{path}: nvrtcVersion failed ({status})"));
        }
        Ok(Nvrtc { api, path: loaded.path.clone(), version: (major, minor), _loaded: loaded })
    }

    fn error(&self, status: Status) -> String {
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any status.
        let text = unsafe { (self.api.error_string)(status) };
        if text.is_null() {
            return format!("NVRTC error {status}");
        }
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }

    /// The real architectures (`sm_XY` as XY) this NVRTC can compile for.
    pub fn supported_archs(&self) -> Vec<u32> {
        let mut count = 0;
        // SAFETY: a valid out-pointer, then a buffer of the count it reported.
        if unsafe { (self.api.num_archs)(&mut count) } != 0 || count <= 0 {
            return Vec::new();
        }
        let mut archs = vec![0 as c_int; count as usize];
        if unsafe { (self.api.archs)(archs.as_mut_ptr()) } != 0 {
            return Vec::new();
        }
        archs.into_iter().filter_map(|a| u32::try_from(a).ok()).collect()
    }

    /// Compiles `source` (named `name` in messages) with `headers` available to `#include "…"`, for
    /// `target`, with further `options`. A failed compilation returns the compiler's log as the error.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
        target: Target,
        options: &[&str],
    ) -> Result<Compiled, String> {
        let cstr = |s: &str| CString::new(s).map_err(|_| format!("{name}: a NUL byte in the source or options"));
        let c_source = cstr(source)?;
        let c_name = cstr(name)?;
        let header_sources = headers.iter().map(|(_, text)| cstr(text)).collect::<Result<Vec<_>, _>>()?;
        let header_names = headers.iter().map(|(file, _)| cstr(file)).collect::<Result<Vec<_>, _>>()?;
        let source_ptrs: Vec<*const c_char> = header_sources.iter().map(|s| s.as_ptr()).collect();
        let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
        let all_options: Vec<CString> = std::iter::once(target.option())
            .chain(options.iter().map(|o| o.to_string()))
            .map(|o| cstr(&o))
            .collect::<Result<_, _>>()?;
        let option_ptrs: Vec<*const c_char> = all_options.iter().map(|o| o.as_ptr()).collect();

        let mut program: Program = std::ptr::null_mut();
        // SAFETY: every pointer is to a live NUL-terminated string; the arrays have the counts passed.
        let status = unsafe {
            (self.api.create)(
                &mut program,
                c_source.as_ptr(),
                c_name.as_ptr(),
                headers.len() as c_int,
                source_ptrs.as_ptr(),
                name_ptrs.as_ptr(),
            )
        };
        if status != 0 {
            return Err(format!("{name}: nvrtcCreateProgram failed: {}", self.error(status)));
        }
        let result = self.compile_program(program, name, target, &option_ptrs);
        // SAFETY: `program` was created above and is destroyed once.
        unsafe { (self.api.destroy)(&mut program) };
        result
    }

    fn compile_program(
        &self,
        program: Program,
        name: &str,
        target: Target,
        options: &[*const c_char],
    ) -> Result<Compiled, String> {
        // SAFETY: a live program and an array of `options.len()` live C strings.
        let status = unsafe { (self.api.compile)(program, options.len() as c_int, options.as_ptr()) };
        let log = self.read(program, self.api.log_size, self.api.log).map(|bytes| text(&bytes)).unwrap_or_default();
        if status != 0 {
            return Err(format!(
                "{name} ({}) does not compile with NVRTC {}.{}: {}\n{log}",
                target.describe(),
                self.version.0,
                self.version.1,
                self.error(status)
            ));
        }
        let code = match target {
            Target::Ptx(_) => self.read(program, self.api.ptx_size, self.api.ptx)?,
            Target::Cubin(_) => self.read(program, self.api.cubin_size, self.api.cubin)?,
        };
        Ok(Compiled { code, log })
    }

    /// Reads one of a program's outputs through its size and copy functions.
    fn read(
        &self,
        program: Program,
        size: unsafe extern "C" fn(Program, *mut usize) -> Status,
        copy: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    ) -> Result<Vec<u8>, String> {
        let mut len = 0usize;
        // SAFETY: a live program and a valid out-pointer, then a buffer of the size it reported.
        let status = unsafe { size(program, &mut len) };
        if status != 0 {
            return Err(self.error(status));
        }
        let mut buf = vec![0u8; len];
        let status = unsafe { copy(program, buf.as_mut_ptr().cast()) };
        if status != 0 {
            return Err(self.error(status));
        }
        Ok(buf)
    }
}

/// NVRTC's text outputs end with a NUL.
fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_owned()
}
