//! A restricted unpickler for the `data.pkl` of a PyTorch checkpoint.
//!
//! It executes and imports nothing. It knows the opcodes a state dict is written with (protocol 2 as
//! `torch.save` writes it, and the protocol 4/5 framing and string forms) and a handful of globals, which it
//! treats as data: `collections.OrderedDict` makes an empty dict, `torch._utils._rebuild_tensor_v2` and
//! `_rebuild_parameter[_with_state]` make tensor descriptions, `torch.<Dtype>Storage` names a storage's
//! element type in a persistent id. Any other opcode or global is refused with its name and byte position.

use super::tensor::{Dtype, StorageRef, TensorRef};
use crate::error::input;
use anyhow::Result;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Nesting deeper than this is refused: a state dict needs a handful of levels, and a hostile pickle could
/// otherwise nest a million tuples and overflow the stack when they are dropped.
const MAX_DEPTH: usize = 64;

/// The tensors of a checkpoint, in pickle order, and the names of entries that are not tensors.
#[derive(Debug)]
pub struct StateDict {
    pub tensors: Vec<(String, TensorRef)>,
    pub ignored: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(Dtype),
}

fn resolve(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", class) => Global::Storage(Dtype::from_storage_class(class)?),
        _ => return None,
    })
}

struct Seq {
    items: Vec<Value>,
    depth: usize,
}

struct Map {
    items: Vec<(Value, Value)>,
    /// Position of each string key, so a repeated key replaces its value as in Python.
    index: HashMap<Rc<str>, usize>,
    depth: usize,
}

impl Map {
    fn new_value() -> Value {
        Value::Dict(Rc::new(RefCell::new(Map { items: Vec::new(), index: HashMap::new(), depth: 1 })))
    }
}

/// Pickle values. Dicts and lists are shared (`Rc<RefCell>`) because the memo and the stack refer to the same
/// object that later opcodes fill in.
#[derive(Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Tuple(Rc<Seq>),
    List(Rc<RefCell<Seq>>),
    Dict(Rc<RefCell<Map>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    fn depth(&self) -> usize {
        match self {
            Value::Tuple(t) => t.depth,
            Value::List(l) => l.borrow().depth,
            Value::Dict(d) => d.borrow().depth,
            _ => 0,
        }
    }
}

/// Reads the state dict of a checkpoint's `data.pkl`; `file` names it in errors.
///
/// The state dict is the top-level dict when it holds any tensor. A checkpoint that wraps it, as training
/// scripts do (`{"state_dict": …, "epoch": …}` or `{"model": …}`), is unwrapped through its `state_dict` or
/// `model` entry, in that order. Entries of the chosen dict that are not tensors (and the wrapper's other
/// entries) are listed in `ignored`: safetensors holds only tensors.
pub fn read_state_dict(bytes: &[u8], file: &str) -> Result<StateDict> {
    let root = Machine { bytes, pos: 0, file, stack: Vec::new(), marks: Vec::new(), memo: Default::default() }.run()?;
    let mut ignored = Vec::new();
    let mut dict = match root {
        Value::Dict(d) => d,
        other => return Err(input(format!("{file}: holds {}, not a state dict of tensors", other.kind()))),
    };
    let mut prefix = String::new();
    for _ in 0..MAX_DEPTH {
        let map = dict.borrow();
        if map.items.iter().any(|(_, v)| matches!(v, Value::Tensor(_))) {
            break;
        }
        let entry = |key: &str| map.index.get(key).map(|&i| &map.items[i]);
        let Some((Value::Str(key), Value::Dict(inner))) = entry("state_dict").or_else(|| entry("model")) else {
            let keys: Vec<String> = map.items.iter().take(8).map(|(k, _)| key_text(k)).collect();
            return Err(input(format!(
                "{file}: holds no tensors, neither at the top level nor under a \"state_dict\" or \"model\" entry \
                 (keys: {})",
                keys.join(", ")
            )));
        };
        for (k, _) in map.items.iter().filter(|(k, _)| !matches!(k, Value::Str(s) if s == key)) {
            ignored.push(format!("{prefix}{}", key_text(k)));
        }
        prefix = format!("{prefix}{key}.");
        let inner = inner.clone();
        drop(map);
        dict = inner;
    }
    let mut tensors = Vec::new();
    for (k, v) in dict.borrow().items.iter() {
        let Value::Str(name) = k else {
            return Err(input(format!("{file}: state dict key {} is {}, not a string", key_text(k), k.kind())));
        };
        match v {
            Value::Tensor(t) => tensors.push((name.to_string(), (**t).clone())),
            _ => ignored.push(format!("{prefix}{name}")),
        }
    }
    if tensors.is_empty() {
        return Err(input(format!("{file}: the state dict holds no tensors")));
    }
    Ok(StateDict { tensors, ignored })
}

/// A dict key as text for messages and the list of ignored entries.
fn key_text(k: &Value) -> String {
    match k {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        other => format!("<{}>", other.kind()),
    }
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl Machine<'_> {
    fn err(&self, at: usize, msg: impl std::fmt::Display) -> anyhow::Error {
        input(format!("{}: data.pkl byte {at}: {msg}", self.file))
    }

    fn take(&mut self, n: usize, at: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.err(at, "the pickle ends in the middle of an opcode (truncated or corrupt)"));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn arg<const N: usize>(&mut self, at: usize) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, at)?);
        Ok(a)
    }

    fn len_arg(&mut self, width: usize, at: usize) -> Result<usize> {
        let mut a = [0u8; 8];
        a[..width].copy_from_slice(self.take(width, at)?);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| self.err(at, "a length does not fit in memory"))
    }

    fn text(&mut self, n: usize, at: usize) -> Result<Rc<str>> {
        let raw = self.take(n, at)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(Rc::from(s)),
            Err(_) => Err(self.err(at, "a string is not valid UTF-8")),
        }
    }

    fn line(&mut self, at: usize) -> Result<String> {
        let rest = &self.bytes[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err(at, "GLOBAL name has no line end (truncated or corrupt)"));
        };
        let s = self.text(n, at)?.to_string();
        self.pos += 1;
        Ok(s)
    }

    fn pop(&mut self, at: usize) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, "the stack is empty (corrupt pickle)"));
        }
        self.stack.pop().ok_or_else(|| self.err(at, "the stack is empty (corrupt pickle)"))
    }

    fn top(&self, at: usize) -> Result<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(v) if self.stack.len() > floor => Ok(v),
            _ => Err(self.err(at, "the stack is empty (corrupt pickle)")),
        }
    }

    fn pop_mark(&mut self, at: usize) -> Result<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err(at, "no MARK before this opcode (corrupt pickle)"));
        };
        Ok(self.stack.split_off(mark))
    }

    fn push(&mut self, v: Value, at: usize) -> Result<()> {
        if v.depth() > MAX_DEPTH {
            return Err(self.err(at, format!("objects nest more than {MAX_DEPTH} deep")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn tuple(&mut self, items: Vec<Value>, at: usize) -> Result<()> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        self.push(Value::Tuple(Rc::new(Seq { items, depth })), at)
    }

    fn put(&mut self, key: u32, at: usize) -> Result<()> {
        let v = self.top(at)?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn get(&mut self, key: u32, at: usize) -> Result<()> {
        let Some(v) = self.memo.get(&key).cloned() else {
            return Err(self.err(at, format!("memo entry {key} is read before it is written (corrupt pickle)")));
        };
        self.push(v, at)
    }

    fn set_items(&mut self, pairs: Vec<Value>, at: usize) -> Result<()> {
        if !pairs.len().is_multiple_of(2) {
            return Err(self.err(at, "SETITEMS has a key without a value (corrupt pickle)"));
        }
        let Value::Dict(dict) = self.top(at)?.clone() else {
            return Err(self.err(at, format!("SETITEM on {}, not a dict", self.top(at)?.kind())));
        };
        let mut it = pairs.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let depth = 1 + k.depth().max(v.depth());
            if depth > MAX_DEPTH {
                return Err(self.err(at, format!("objects nest more than {MAX_DEPTH} deep")));
            }
            let mut map = dict.borrow_mut();
            map.depth = map.depth.max(depth);
            let existing = match &k {
                Value::Str(s) => map.index.get(s).copied(),
                _ => None,
            };
            match existing {
                Some(i) => map.items[i].1 = v,
                None => {
                    if let Value::Str(s) = &k {
                        let at = map.items.len();
                        map.index.insert(s.clone(), at);
                    }
                    map.items.push((k, v));
                }
            }
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>, at: usize) -> Result<()> {
        let Value::List(list) = self.top(at)?.clone() else {
            return Err(self.err(at, format!("APPEND to {}, not a list", self.top(at)?.kind())));
        };
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(self.err(at, format!("objects nest more than {MAX_DEPTH} deep")));
        }
        let mut seq = list.borrow_mut();
        seq.depth = seq.depth.max(depth);
        seq.items.extend(items);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str, at: usize) -> Result<()> {
        match resolve(module, name) {
            Some(g) => self.push(Value::Global(g), at),
            None if module == "torch" && name.ends_with("Storage") => Err(self.err(
                at,
                format!(
                    "storage type `torch.{name}` has no safetensors equivalent (bool, integer, f16, bf16, f32 and \
                     f64 storages convert)"
                ),
            )),
            None => Err(self.err(
                at,
                format!(
                    "refuses global `{module}.{name}`: a state dict needs only torch storages, tensor rebuilders \
                     and OrderedDict, and nothing in a checkpoint is ever executed"
                ),
            )),
        }
    }

    /// BINPERSID: `('storage', torch.<Dtype>Storage, key, location, numel)`.
    fn persistent(&mut self, pid: Value, at: usize) -> Result<Value> {
        if let Value::Tuple(t) = &pid
            && let [
                Value::Str(tag),
                Value::Global(Global::Storage(dtype)),
                Value::Str(key),
                Value::Str(_),
                Value::Int(n),
            ] = &t.items[..]
            && &**tag == "storage"
            && *n >= 0
        {
            return Ok(Value::Storage(Rc::new(StorageRef { key: key.to_string(), dtype: *dtype, numel: *n as u64 })));
        }
        Err(self.err(at, "a persistent id is not ('storage', torch.<Dtype>Storage, key, location, numel)"))
    }

    fn reduce(&mut self, callable: Value, args: Value, at: usize) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Err(self.err(at, format!("REDUCE calls {}, not a known torch function", callable.kind())));
        };
        let Value::Tuple(args) = args else {
            return Err(self.err(at, "REDUCE arguments are not a tuple (corrupt pickle)"));
        };
        let args = &args.items[..];
        match g {
            Global::OrderedDict if args.is_empty() => Ok(Map::new_value()),
            Global::OrderedDict => Err(self.err(at, "OrderedDict is built with arguments; expected an empty one")),
            Global::RebuildTensorV2 => self.rebuild_tensor(args, at).map(|t| Value::Tensor(Rc::new(t))),
            Global::RebuildParameter | Global::RebuildParameterWithState => match args {
                [Value::Tensor(t), Value::Bool, _] | [Value::Tensor(t), Value::Bool, _, _] => {
                    Ok(Value::Tensor(t.clone()))
                }
                _ => Err(self.err(at, "_rebuild_parameter expects (tensor, requires_grad, hooks[, state])")),
            },
            Global::Storage(_) => Err(self.err(at, "a storage class is called; torch never writes that")),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])`.
    fn rebuild_tensor(&self, args: &[Value], at: usize) -> Result<TensorRef> {
        let usage = "_rebuild_tensor_v2 expects (storage, offset, size, stride, requires_grad, hooks[, metadata])";
        let (storage, offset, size, stride) = match args {
            [Value::Storage(s), Value::Int(o), Value::Tuple(size), Value::Tuple(stride), Value::Bool, _]
            | [Value::Storage(s), Value::Int(o), Value::Tuple(size), Value::Tuple(stride), Value::Bool, _, _] => {
                (s, *o, size, stride)
            }
            _ => return Err(self.err(at, usage)),
        };
        let ints = |t: &Seq| -> Option<Vec<u64>> {
            t.items.iter().map(|v| if let Value::Int(i) = v { u64::try_from(*i).ok() } else { None }).collect()
        };
        let (Some(size), Some(stride), Ok(offset)) = (ints(size), ints(stride), u64::try_from(offset)) else {
            return Err(self.err(at, format!("{usage}, with non-negative integers")));
        };
        TensorRef::new((**storage).clone(), offset, size, stride).map_err(|e| self.err(at, format!("a tensor's {e}")))
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let Some(&op) = self.bytes.get(at) else {
                return Err(self.err(at, "the pickle ends without STOP (truncated or corrupt)"));
            };
            self.pos += 1;
            match op {
                0x80 => {
                    let [proto] = self.arg::<1>(at)?;
                    if !(2..=5).contains(&proto) {
                        return Err(self.err(at, format!("pickle protocol {proto}; torch writes 2 (3 to 5 read too)")));
                    }
                }
                0x95 => {
                    self.arg::<8>(at)?; // FRAME: a length hint only
                }
                b'.' => {
                    let v = self.pop(at)?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err(self.err(at, "STOP with values left on the stack (corrupt pickle)"));
                    }
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.push(Map::new_value(), at)?,
                b']' => self.push(Value::List(Rc::new(RefCell::new(Seq { items: Vec::new(), depth: 1 }))), at)?,
                b')' => self.tuple(Vec::new(), at)?,
                b't' => {
                    let items = self.pop_mark(at)?;
                    self.tuple(items, at)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at)?);
                    }
                    items.reverse();
                    self.tuple(items, at)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.arg::<4>(at)?);
                    self.push(Value::Int(v as i64), at)?;
                }
                b'K' => {
                    let [v] = self.arg::<1>(at)?;
                    self.push(Value::Int(v as i64), at)?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arg::<2>(at)?);
                    self.push(Value::Int(v as i64), at)?;
                }
                0x8a => {
                    let [n] = self.arg::<1>(at)?;
                    if n > 8 {
                        return Err(self.err(at, format!("a {n}-byte integer; at most 8 bytes are supported")));
                    }
                    let raw = self.take(n as usize, at)?;
                    let fill = if raw.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 };
                    let mut a = [fill; 8];
                    a[..raw.len()].copy_from_slice(raw);
                    self.push(Value::Int(i64::from_le_bytes(a)), at)?;
                }
                b'G' => {
                    self.arg::<8>(at)?;
                    self.push(Value::Float, at)?;
                }
                b'N' => self.push(Value::None, at)?,
                0x88 | 0x89 => self.push(Value::Bool, at)?,
                b'X' | 0x8c | 0x8d => {
                    let width = match op {
                        b'X' => 4,
                        0x8c => 1,
                        _ => 8,
                    };
                    let n = self.len_arg(width, at)?;
                    let s = self.text(n, at)?;
                    self.push(Value::Str(s), at)?;
                }
                b'c' => {
                    let module = self.line(at)?;
                    let name = self.line(at)?;
                    self.global(&module, &name, at)?;
                }
                0x93 => {
                    let (name, module) = (self.pop(at)?, self.pop(at)?);
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.err(at, "STACK_GLOBAL without two strings (corrupt pickle)"));
                    };
                    self.global(&module, &name, at)?;
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    let v = self.persistent(pid, at)?;
                    self.push(v, at)?;
                }
                b'R' => {
                    let args = self.pop(at)?;
                    let callable = self.pop(at)?;
                    let v = self.reduce(callable, args, at)?;
                    self.push(v, at)?;
                }
                b'b' => {
                    // BUILD sets instance attributes. Only a dict's attributes are expected (a module state dict's
                    // `_metadata`); they are not tensors, so they are dropped.
                    let state = self.pop(at)?;
                    match (self.top(at)?, &state) {
                        (Value::Dict(_), Value::Dict(_) | Value::None) => {}
                        (target, _) => {
                            return Err(self.err(at, format!("BUILD on {} with {}", target.kind(), state.kind())));
                        }
                    }
                }
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    self.set_items(vec![k, v], at)?;
                }
                b'u' => {
                    let pairs = self.pop_mark(at)?;
                    self.set_items(pairs, at)?;
                }
                b'a' => {
                    let v = self.pop(at)?;
                    self.append(vec![v], at)?;
                }
                b'e' => {
                    let items = self.pop_mark(at)?;
                    self.append(items, at)?;
                }
                b'q' => {
                    let [k] = self.arg::<1>(at)?;
                    self.put(k as u32, at)?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.arg::<4>(at)?);
                    self.put(k, at)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| self.err(at, "too many memo entries"))?;
                    self.put(k, at)?;
                }
                b'h' => {
                    let [k] = self.arg::<1>(at)?;
                    self.get(k as u32, at)?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.arg::<4>(at)?);
                    self.get(k, at)?;
                }
                other => {
                    return Err(self.err(
                        at,
                        format!("opcode {} ({}) is not one a state dict is written with", opname(other), op_hex(other)),
                    ));
                }
            }
        }
    }
}

fn op_hex(op: u8) -> String {
    format!("0x{op:02x}")
}

/// Names of the pickle opcodes this reader refuses, for error messages.
fn opname(op: u8) -> &'static str {
    match op {
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        0x8b => "LONG4",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8e => "BINBYTES8",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'l' => "LIST",
        b'd' => "DICT",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        b'g' => "GET",
        b'p' => "PUT",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        b'P' => "PERSID",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protocol-2 bytes for `OrderedDict(w=_rebuild_tensor_v2(('storage', torch.HalfStorage, '0', 'cpu', 6),
    /// 1, (2, 2), (1, 2), False, OrderedDict()), step=7)`, written the way torch writes it.
    fn tiny() -> Vec<u8> {
        let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)R(X\x01\x00\x00\x00w".to_vec();
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nHalfStorage\n");
        p.extend_from_slice(
            b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK\x01K\x02K\x02\x86K\x01K\x02\x86\x89h\x00)Rt",
        );
        p.extend_from_slice(b"RX\x04\x00\x00\x00stepK\x07u.");
        p
    }

    #[test]
    fn reads_a_torch_style_state_dict() {
        let sd = read_state_dict(&tiny(), "t.bin").unwrap();
        assert_eq!(sd.ignored, vec!["step".to_string()]);
        let (name, t) = &sd.tensors[0];
        assert_eq!(name, "w");
        assert_eq!(t.storage, StorageRef { key: "0".into(), dtype: Dtype::F16, numel: 6 });
        assert_eq!((t.offset, &t.shape[..], &t.stride[..]), (1, &[2, 2][..], &[1, 2][..]));
    }

    #[test]
    fn every_truncation_is_an_input_error() {
        let p = tiny();
        for n in 0..p.len() {
            let err = read_state_dict(&p[..n], "t.bin").unwrap_err();
            assert!(crate::error::is_input_error(&err), "{n}: {err}");
            assert!(err.to_string().starts_with("t.bin: data.pkl byte"), "{err}");
        }
    }

    #[test]
    fn foreign_globals_and_opcodes_are_refused_by_name() {
        let p = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00lsR.";
        let err = read_state_dict(p, "t.bin").unwrap_err().to_string();
        assert!(err.contains("byte 2: refuses global `posix.system`"), "{err}");
        let p = b"\x80\x02ccollections\nOrderedDict\n)\x81.";
        let err = read_state_dict(p, "t.bin").unwrap_err().to_string();
        assert!(err.contains("opcode NEWOBJ (0x81)"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 100_000));
        p.push(b'.');
        let err = read_state_dict(&p, "t.bin").unwrap_err().to_string();
        assert!(err.contains("nest more than 64 deep"), "{err}");
    }

    #[test]
    fn wrapped_state_dicts_are_unwrapped_and_other_roots_refused() {
        // {"epoch": 3, "state_dict": <tiny>}
        let inner = tiny();
        let mut p = b"\x80\x02}(X\x05\x00\x00\x00epochK\x03X\x0a\x00\x00\x00state_dict".to_vec();
        p.extend_from_slice(&inner[2..inner.len() - 1]);
        p.extend_from_slice(b"u.");
        let sd = read_state_dict(&p, "t.bin").unwrap();
        assert_eq!(sd.tensors.len(), 1);
        assert_eq!(sd.ignored, vec!["epoch".to_string(), "state_dict.step".to_string()]);
        let err = read_state_dict(b"\x80\x02K\x01.", "t.bin").unwrap_err().to_string();
        assert_eq!(err, "t.bin: holds an int, not a state dict of tensors");
    }
}
