//! A restricted reader for PyTorch checkpoints (`.ckpt` / `.pt`: `torch.save`'s zip of a
//! pickle plus one file per storage) that never executes pickled code.
//!
//! A pickle is a program for Python's unpickler: it may import and call any function, which
//! is how a malicious checkpoint runs `os.system`. This module interprets the pickle opcodes
//! itself and performs only the calls `torch.save` emits for a state dict, the same allow
//! list as `torch.load(weights_only=True)` in spirit:
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` / `_rebuild_parameter`,
//! `collections.OrderedDict`, and storages named by persistent id
//! (`('storage', torch.FloatStorage, key, location, numel)`). A reference to any other global
//! is kept as an inert name; calling it (`REDUCE`, `NEWOBJ`, `BUILD` on it, `INST`, `OBJ`) is
//! refused with an error naming it. Nothing in the file is ever run.
//!
//! Why our own: `serde-pickle` has no persistent ids (so cannot read torch's format),
//! `repugnant-pickle` is a 0.0.1 scraper, and `candle-core`'s reader comes with a whole tensor
//! framework; the opcodes torch uses are few (see `docs/SINGLE_FILE.md`).

use crate::error::{Error, Result};
use std::collections::HashMap;

/// A storage named by a persistent id: `archive/data/<key>` holds `numel` elements.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// The storage class name (`FloatStorage`, `HalfStorage`, ...).
    pub class: String,
    pub key: String,
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// In elements.
    pub offset: u64,
    pub size: Vec<u64>,
    /// In elements.
    pub stride: Vec<u64>,
}

/// A pickled value, as far as a state dict needs them.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// An inert reference `module.name` (never called).
    Global(String, String),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// An integer too large for i64 (kept only to report it).
    BigInt,
}

impl Value {
    /// The value of `key` in a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => {
                items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v)
            }
            _ => None,
        }
    }
}

fn refuse(what: String) -> Error {
    Error::Checkpoint(format!(
        "refusing this PyTorch checkpoint: {what} (sdsparse reads tensors only and never runs pickled code; \
         convert the file to .safetensors with a tool you trust)"
    ))
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("corrupt PyTorch checkpoint pickle: {what}"))
}

/// Calls the unpickler may perform: `module.name` → what it builds.
fn allowed_call(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_tensor")
            | ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state")
    )
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(bad("unexpected end of data"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| bad("short u64"))?))
    }
    fn len_u64(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).map_err(|_| bad("length out of range"))
    }
    /// A newline-terminated text argument (protocol-0 opcodes).
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| bad("unterminated line"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| bad("non-UTF-8 text argument"))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad("invalid UTF-8 string"))
    }
}

/// Signed little-endian integer of any width (LONG1 / LONG4).
fn long_le(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() > 8 {
        let sign = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        if b[8..].iter().any(|&x| x != sign) {
            return Value::BigInt;
        }
    }
    let mut buf = [if b[b.len() - 1] & 0x80 != 0 { 0xffu8 } else { 0 }; 8];
    let n = b.len().min(8);
    buf[..n].copy_from_slice(&b[..n]);
    Value::Int(i64::from_le_bytes(buf))
}

/// Nesting and size limits that keep a hostile pickle from exhausting memory.
const MAX_STACK: usize = 1 << 20;

/// Interprets `data` (a `data.pkl`) and returns the unpickled root value.
pub fn load(data: &[u8]) -> Result<Value> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    // Stack positions of MARKs.
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();

    fn pop(stack: &mut Vec<Value>) -> Result<Value> {
        stack.pop().ok_or_else(|| bad("stack underflow"))
    }
    fn pop_mark(stack: &mut Vec<Value>, marks: &mut Vec<usize>) -> Result<Vec<Value>> {
        let m = marks.pop().ok_or_else(|| bad("no MARK"))?;
        if m > stack.len() {
            return Err(bad("MARK above the stack"));
        }
        Ok(stack.split_off(m))
    }
    fn top(stack: &mut [Value]) -> Result<&mut Value> {
        stack.last_mut().ok_or_else(|| bad("stack underflow"))
    }
    fn set_items(target: &mut Value, items: Vec<Value>) -> Result<()> {
        let Value::Dict(d) = target else { return Err(bad("SETITEM(S) on a non-dict")) };
        if !items.len().is_multiple_of(2) {
            return Err(bad("odd number of dict items"));
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
    fn append(target: &mut Value, items: Vec<Value>) -> Result<()> {
        match target {
            Value::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(bad("APPEND(S) on a non-list")),
        }
    }

    loop {
        if stack.len() > MAX_STACK {
            return Err(bad("stack too deep"));
        }
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.u64()?; // FRAME: a size hint
            }
            b'.' => return pop(&mut stack), // STOP
            b'(' => marks.push(stack.len()),
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack, &mut marks)?;
            }
            b'2' => {
                let v = top(&mut stack)?.clone();
                stack.push(v);
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                stack.push(long_le(r.take(n)?));
            }
            0x8b => {
                let n = r.u32()? as usize;
                stack.push(long_le(r.take(n)?));
            }
            b'I' | b'L' => {
                let s = r.line()?.trim_end_matches('L');
                stack.push(match s {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => s.parse::<i64>().map(Value::Int).unwrap_or(Value::BigInt),
                });
            }
            b'G' => {
                let b = r.take(8)?;
                stack.push(Value::Float(f64::from_be_bytes(b.try_into().map_err(|_| bad("short float"))?)));
            }
            b'F' => {
                let s = r.line()?;
                stack.push(Value::Float(s.parse().map_err(|_| bad("bad FLOAT"))?));
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8d => {
                let n = r.len_u64()?;
                stack.push(Value::Str(r.string(n)?));
            }
            b'V' => stack.push(Value::Str(r.line()?.to_string())),
            b'T' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.take(n)?.iter().map(|&b| b as char).collect()));
            }
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.take(n)?.iter().map(|&b| b as char).collect()));
            }
            b'S' => {
                let s = r.line()?;
                stack.push(Value::Str(s.trim_matches(|c| c == '\'' || c == '"').to_string()));
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            0x8e => {
                let n = r.len_u64()?;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(bad("stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b']' => stack.push(Value::List(Vec::new())),
            b'l' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::List(items));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                append(top(&mut stack)?, vec![v])?;
            }
            b'e' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                append(top(&mut stack)?, items)?;
            }
            b'}' => stack.push(Value::Dict(Vec::new())),
            b'd' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                let mut d = Value::Dict(Vec::new());
                set_items(&mut d, items)?;
                stack.push(d);
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(top(&mut stack)?, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                set_items(top(&mut stack)?, items)?;
            }
            0x8f => stack.push(Value::List(Vec::new())), // EMPTY_SET (kept as a list)
            0x90 => {
                let items = pop_mark(&mut stack, &mut marks)?;
                append(top(&mut stack)?, items)?;
            }
            0x91 => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::List(items));
            }
            // Memo: values are copied in (a later mutation of a memoised container is not
            // seen through the memo; torch's state dicts never rely on that).
            b'p' => {
                let k = r.line()?.parse::<u64>().map_err(|_| bad("bad PUT index"))?;
                let v = top(&mut stack)?.clone();
                memo.insert(k, v);
            }
            b'q' => {
                let k = r.u8()? as u64;
                let v = top(&mut stack)?.clone();
                memo.insert(k, v);
            }
            b'r' => {
                let k = r.u32()? as u64;
                let v = top(&mut stack)?.clone();
                memo.insert(k, v);
            }
            0x94 => {
                let k = memo.len() as u64;
                let v = top(&mut stack)?.clone();
                memo.insert(k, v);
            }
            b'g' | b'h' | b'j' => {
                let k = match op {
                    b'g' => r.line()?.parse::<u64>().map_err(|_| bad("bad GET index"))?,
                    b'h' => r.u8()? as u64,
                    _ => r.u32()? as u64,
                };
                let v = memo.get(&k).ok_or_else(|| bad(format!("memo {k} not set")))?.clone();
                stack.push(v);
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return Err(bad("STACK_GLOBAL needs two strings")),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent_load(pid)?);
            }
            b'P' => return Err(refuse("it uses text persistent ids (not torch.save's format)".into())),
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(call(callable, args)?);
            }
            0x81 | 0x92 => {
                // NEWOBJ / NEWOBJ_EX: cls.__new__(cls, *args)
                if op == 0x92 {
                    pop(&mut stack)?; // kwargs
                }
                let args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                stack.push(call(cls, args)?);
            }
            b'b' => {
                // BUILD: obj.__setstate__(state). Only containers and tensors we built may be
                // given state (an OrderedDict's `_metadata`, a parameter's hooks): ignored.
                let _state = pop(&mut stack)?;
                match top(&mut stack)? {
                    Value::Dict(_) | Value::Tensor(_) => {}
                    Value::Global(m, n) => return Err(refuse(format!("it sets the state of {m}.{n}"))),
                    other => return Err(refuse(format!("it sets the state of a {}", kind(other)))),
                }
            }
            b'i' => {
                let module = r.line()?;
                let name = r.line()?;
                return Err(refuse(format!("it instantiates {module}.{name}")));
            }
            b'o' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                let what = match items.first() {
                    Some(Value::Global(m, n)) => format!("{m}.{n}"),
                    _ => "an object".into(),
                };
                return Err(refuse(format!("it instantiates {what}")));
            }
            0x82..=0x84 => return Err(refuse("it uses the extension registry (EXT opcodes)".into())),
            0x96..=0x98 => return Err(refuse("it uses out-of-band buffers (protocol 5)".into())),
            other => return Err(bad(format!("unknown opcode 0x{other:02x} at byte {}", r.pos - 1))),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) | Value::BigInt => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Bytes(_) => "bytes",
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) => "dict",
        Value::Global(..) => "global",
        Value::Storage(_) => "storage",
        Value::Tensor(_) => "tensor",
    }
}

/// `torch.save`'s persistent id of a storage: `('storage', torch.XStorage, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else { return Err(refuse("a persistent id that is not a tuple".into())) };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(module, class), Value::Str(key), _location, Value::Int(numel)]
            if tag == "storage" && (module == "torch" || module == "torch.storage") =>
        {
            if *numel < 0 {
                return Err(bad("negative storage size"));
            }
            Ok(Value::Storage(StorageRef { class: class.clone(), key: key.clone(), numel: *numel as u64 }))
        }
        _ => Err(refuse(format!("an unknown persistent id {items:?}"))),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<u64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as u64),
                _ => Err(bad(format!("{what} holds a non-integer or negative value"))),
            })
            .collect(),
        _ => Err(bad(format!("{what} is not a tuple"))),
    }
}

/// Performs one allowed call.
fn call(callable: Value, args: Value) -> Result<Value> {
    let (module, name) = match &callable {
        Value::Global(m, n) => (m.as_str(), n.as_str()),
        other => return Err(refuse(format!("it calls a {}", kind(other)))),
    };
    if !allowed_call(module, name) {
        return Err(refuse(format!("it calls {module}.{name}, which is not a tensor-rebuild call")));
    }
    let Value::Tuple(args) = args else {
        return Err(bad(format!("{module}.{name}: arguments are not a tuple")));
    };
    match name {
        "OrderedDict" => match args.as_slice() {
            [] => Ok(Value::Dict(Vec::new())),
            [Value::List(pairs)] | [Value::Tuple(pairs)] => {
                let mut d = Vec::new();
                for p in pairs {
                    match p {
                        Value::Tuple(kv) | Value::List(kv) if kv.len() == 2 => {
                            d.push((kv[0].clone(), kv[1].clone()))
                        }
                        _ => return Err(bad("OrderedDict item is not a pair")),
                    }
                }
                Ok(Value::Dict(d))
            }
            _ => Err(bad("OrderedDict with unexpected arguments")),
        },
        "_rebuild_tensor_v2" | "_rebuild_tensor" => {
            if args.len() < 4 {
                return Err(bad(format!("{name} with {} arguments", args.len())));
            }
            let Value::Storage(storage) = &args[0] else {
                return Err(refuse(format!("{name} of a {} instead of a storage", kind(&args[0]))));
            };
            let offset = match &args[1] {
                Value::Int(o) if *o >= 0 => *o as u64,
                _ => return Err(bad("tensor storage offset is not a non-negative integer")),
            };
            let size = ints(&args[2], "tensor size")?;
            let stride = ints(&args[3], "tensor stride")?;
            if size.len() != stride.len() {
                return Err(bad("tensor size and stride differ in length"));
            }
            Ok(Value::Tensor(TensorRef { storage: storage.clone(), offset, size, stride }))
        }
        // _rebuild_parameter(data, requires_grad, backward_hooks[, state]) → data
        _ => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err(bad(format!("{name} of something other than a tensor"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system() {
        // pickle.dumps of an object whose __reduce__ returns (os.system, ('echo pwned',)), protocol 2.
        let p = b"\x80\x02cposix\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
        let e = load(p).unwrap_err().to_string();
        assert!(e.contains("posix.system"), "{e}");
        assert!(e.contains("refusing"), "{e}");
    }

    #[test]
    fn reads_a_dict_of_tensors() {
        // {'w': _rebuild_tensor_v2(storage('0', FloatStorage, 6), 0, (2, 3), (3, 1), False, OrderedDict())}
        let mut p = Vec::new();
        p.extend_from_slice(
            b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02(",
        );
        p.extend_from_slice(b"(X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x06tq\x07Q");
        p.extend_from_slice(b"K\x00K\x02K\x03\x86q\x08K\x03K\x01\x86q\x09\x89ccollections\nOrderedDict\nq\x0a)Rq\x0btq\x0cRq\x0ds.");
        let v = load(&p).unwrap();
        let Some(Value::Tensor(t)) = v.get("w") else { panic!("{v:?}") };
        assert_eq!(t.size, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        assert_eq!(t.storage.class, "FloatStorage");
        assert_eq!(t.storage.numel, 6);
    }

    #[test]
    fn truncated_and_garbage_input_are_errors_not_panics() {
        assert!(load(b"").is_err());
        assert!(load(b"\x80\x02}q").is_err());
        assert!(load(b"\x80\x02X\xff\xff\xff\xff").is_err());
        assert!(load(b"\x80\x02u.").is_err());
        assert!(load(b"\x80\x02h\x07.").is_err());
        assert!(load(&[0xff; 16]).is_err());
    }
}
