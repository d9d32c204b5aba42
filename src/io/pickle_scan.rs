//! A dry run of `data.pkl` before candle's pickle machine builds anything (issue 10).
//!
//! `candle_core::pickle::Stack` materialises every object, clones memo entries in full on each
//! `BINGET`/`BINPUT`, and clones, compares, formats and drops its `Object` tree recursively. So
//! a 1 MB pickle of a million nested tuples overflows the thread's stack (an abort, not an
//! error), and 40 doublings of `BINGET`/`TUPLE2` ("billion laughs", 220 bytes) ask for 2^40
//! objects. Some opcode arguments are trusted too: `BINUNICODE` allocates its declared length
//! before reading it, and `LONG1` with more than 8 bytes overflows a shift.
//!
//! [`scan`] replays the opcodes exactly as candle 0.11 interprets them (including its reading
//! of `DICT` as `EMPTY_DICT`), but keeps for each stack item only its kind, nesting depth and
//! heap cost. It refuses, with one line naming the byte offset, any pickle that nests deeper
//! than [`MAX_DEPTH`], that would make candle allocate more than [`budget`] bytes in all, or on
//! which candle would fail (so candle never formats a huge object into an error message).
//! What passes is then parsed by candle with bounded memory and recursion.

use candle_core::pickle::Object;
use std::collections::HashMap;

/// Deepest nesting of pickled containers accepted (state dicts nest about five levels).
pub(crate) const MAX_DEPTH: u32 = 256;

/// Bytes of candle objects a pickle of `len` bytes may build in all (clones included):
/// generous for real state dicts (which build about 20 bytes per pickle byte), small enough
/// that no pickle can exhaust memory.
pub(crate) fn budget(len: usize) -> u64 {
    (len as u64).saturating_mul(256).saturating_add(16 << 20)
}

/// Heap bytes of one `Object` node (its inline size; strings add their length).
const NODE: u64 = std::mem::size_of::<Object>() as u64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Mark,
    List,
    Dict,
    /// `collections.OrderedDict` / `defaultdict`, which candle's `REDUCE` turns into a dict.
    DictClass,
    Other,
}

/// The shadow of one stack item: kind, nesting depth, heap bytes.
#[derive(Clone, Copy, Debug)]
struct Item {
    kind: Kind,
    depth: u32,
    cost: u64,
}

impl Item {
    fn leaf(kind: Kind, extra: u64) -> Self {
        Item {
            kind,
            depth: 0,
            cost: NODE + extra,
        }
    }

    /// A new node holding `items` (a tuple, a reduce, a persistent id ...).
    fn node(kind: Kind, items: &[Item]) -> Self {
        Item {
            kind,
            depth: items.iter().map(|i| i.depth).max().unwrap_or(0) + 1,
            cost: items.iter().fold(NODE, |a, i| a.saturating_add(i.cost)),
        }
    }

    /// `self` with `items` appended (a list's `APPEND`, a dict's `SETITEM`).
    fn extend(&mut self, items: &[Item]) {
        for i in items {
            self.depth = self.depth.max(i.depth + 1);
            self.cost = self.cost.saturating_add(i.cost);
        }
    }
}

/// The replayed machine.
struct Scan<'a> {
    pkl: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Item>,
    /// Bytes candle would have allocated so far (never decreased: a bound, not a balance).
    total: u64,
    budget: u64,
}

impl<'a> Scan<'a> {
    fn fail(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!("cannot parse data.pkl: {what} at byte {}", self.pos)
    }

    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.pkl.len());
        let Some(end) = end else {
            return Err(self.fail("truncated (an opcode's argument runs past the end)"));
        };
        let s = &self.pkl[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Candle's `read_to_newline`: up to and without the next `\n` (and a `\r` before it), or
    /// to the end.
    fn line(&mut self) -> &'a [u8] {
        let rest = &self.pkl[self.pos..];
        let (mut line, used) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], i + 1),
            None => (rest, rest.len()),
        };
        self.pos += used;
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        line
    }

    fn charge(&mut self, cost: u64) -> anyhow::Result<()> {
        self.total = self.total.saturating_add(cost);
        if self.total > self.budget {
            return Err(self.fail(&format!(
                "it would build more than {} bytes of objects from {} bytes of pickle (memo \
                 copies multiplying?)",
                self.budget,
                self.pkl.len()
            )));
        }
        Ok(())
    }

    fn push(&mut self, item: Item) -> anyhow::Result<()> {
        if item.depth > MAX_DEPTH {
            return Err(self.fail(&format!("containers nested more than {MAX_DEPTH} deep")));
        }
        self.charge(item.cost)?;
        self.stack.push(item);
        Ok(())
    }

    fn pop(&mut self) -> anyhow::Result<Item> {
        match self.stack.pop() {
            Some(i) => Ok(i),
            None => Err(self.fail("pops an empty stack")),
        }
    }

    fn pop_n(&mut self, n: usize) -> anyhow::Result<Vec<Item>> {
        if self.stack.len() < n {
            return Err(self.fail("pops an empty stack"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_to_mark(&mut self) -> anyhow::Result<Vec<Item>> {
        match self.stack.iter().rposition(|i| i.kind == Kind::Mark) {
            Some(m) => {
                let items = self.stack.split_off(m + 1);
                self.stack.pop();
                Ok(items)
            }
            None => Err(self.fail("no MARK before a tuple/list/dict end")),
        }
    }

    /// Adds `items` to the container on top of the stack, which must be of `kind`.
    fn add_to_top(&mut self, kind: Kind, items: &[Item]) -> anyhow::Result<()> {
        let what = if kind == Kind::List {
            "APPEND onto something not a list"
        } else {
            "SETITEM onto something not a dict"
        };
        let Some(top) = self.stack.last_mut().filter(|t| t.kind == kind) else {
            return Err(self.fail(what));
        };
        // The items move into the container: they were charged when pushed.
        top.extend(items);
        if top.depth > MAX_DEPTH {
            return Err(self.fail(&format!("containers nested more than {MAX_DEPTH} deep")));
        }
        Ok(())
    }

    fn memo_put(&mut self, id: u32) -> anyhow::Result<()> {
        let Some(&top) = self.stack.last() else {
            return Err(self.fail("BINPUT on an empty stack"));
        };
        self.charge(top.cost)?;
        self.memo.insert(id, top);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> anyhow::Result<()> {
        let Some(&item) = self.memo.get(&id) else {
            return Err(self.fail(&format!("BINGET of memo entry {id}, never stored")));
        };
        self.push(item)
    }

    /// One opcode; `Ok(true)` at `STOP`.
    fn step(&mut self) -> anyhow::Result<bool> {
        let op = self.take(1)?[0];
        match op {
            0x80 => {
                self.take(1)?;
            }
            b'c' => {
                let module = self.line();
                let class = self.line();
                let kind = if module == b"collections"
                    && (class == b"OrderedDict" || class == b"defaultdict")
                {
                    Kind::DictClass
                } else {
                    Kind::Other
                };
                self.push(Item::leaf(kind, (module.len() + class.len()) as u64))?;
            }
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                self.take(n)?;
                self.push(Item::leaf(Kind::Other, 0))?;
            }
            b'X' => {
                // Checked before candle allocates the declared length.
                let n = self.u32()? as usize;
                self.take(n)?;
                self.push(Item::leaf(Kind::Other, n as u64))?;
            }
            0x8a => {
                let n = self.take(1)?[0] as usize;
                if n > 8 {
                    return Err(self.fail(&format!("LONG1 of {n} bytes (at most 8 supported)")));
                }
                self.take(n)?;
                self.push(Item::leaf(Kind::Other, 0))?;
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(Item::node(Kind::Other, &[id]))?;
            }
            b't' => {
                let items = self.pop_to_mark()?;
                self.push(Item::node(Kind::Other, &items))?;
            }
            0x85..=0x87 => {
                let items = self.pop_n((op - 0x84) as usize)?;
                self.push(Item::node(Kind::Other, &items))?;
            }
            0x88 | 0x89 | b'N' => self.push(Item::leaf(Kind::Other, 0))?,
            b'a' => {
                let v = self.pop()?;
                self.add_to_top(Kind::List, &[v])?;
            }
            b'e' => {
                let items = self.pop_to_mark()?;
                self.add_to_top(Kind::List, &items)?;
            }
            b's' => {
                let kv = self.pop_n(2)?;
                self.add_to_top(Kind::Dict, &kv)?;
            }
            b'u' => {
                let items = self.pop_to_mark()?;
                if items.len() % 2 != 0 {
                    return Err(self.fail("SETITEMS with an odd number of items"));
                }
                self.add_to_top(Kind::Dict, &items)?;
            }
            b'.' => return Ok(true),
            b'b' => {
                let args = self.pop()?;
                let obj = self.pop()?;
                if obj.kind == Kind::Dict && args.kind == Kind::Dict {
                    let mut d = obj;
                    d.extend(&[args]);
                    self.push(d)?;
                } else {
                    self.push(Item::node(Kind::Other, &[obj, args]))?;
                }
            }
            // Candle reads `DICT` ('d') as `EMPTY_DICT`.
            b'}' | b'd' => self.push(Item::leaf(Kind::Dict, 0))?,
            b'(' => self.push(Item::leaf(Kind::Mark, 0))?,
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                if op == b'R' && callable.kind == Kind::DictClass {
                    self.push(Item::leaf(Kind::Dict, 0))?;
                } else {
                    self.push(Item::node(Kind::Other, &[callable, args]))?;
                }
            }
            b')' => self.push(Item::leaf(Kind::Other, 0))?,
            b']' => self.push(Item::leaf(Kind::List, 0))?,
            b'h' => {
                let id = self.take(1)?[0] as u32;
                self.memo_get(id)?;
            }
            b'j' => {
                let id = self.u32()?;
                self.memo_get(id)?;
            }
            b'q' => {
                let id = self.take(1)?[0] as u32;
                self.memo_put(id)?;
            }
            b'r' => {
                let id = self.u32()?;
                self.memo_put(id)?;
            }
            other => {
                self.pos -= 1;
                return Err(self.fail(&format!(
                    "unknown opcode 0x{other:02x} (only pickle protocol 2 is supported)"
                )));
            }
        }
        Ok(false)
    }
}

/// Replays `pkl` as candle would parse it and refuses it (one line, naming the byte) when it
/// nests deeper than [`MAX_DEPTH`], would allocate more than [`budget`] bytes, ends before its
/// `STOP`, or would make candle fail. `Ok` means candle's parse is bounded.
pub(crate) fn scan(pkl: &[u8]) -> anyhow::Result<()> {
    let mut s = Scan {
        pkl,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        total: 0,
        budget: budget(pkl.len()),
    };
    while !s.step()? {}
    if s.stack.is_empty() {
        return Err(s.fail("STOP with nothing on the stack"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::pickle::Stack;
    use std::time::Instant;

    fn candle(pkl: &[u8]) -> candle_core::Result<Object> {
        let mut s = Stack::empty();
        s.read_loop(&mut &pkl[..])?;
        s.finalize()
    }

    /// `{"a": (1, [2, 3.5], "x"), "b": OrderedDict()}` with memo puts and gets, as torch writes.
    fn ordinary() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend(b"X\x01\x00\x00\x00aq\x01K\x01]q\x02(K\x02G");
        p.extend(3.5f64.to_be_bytes());
        p.extend(b"eX\x01\x00\x00\x00x\x87q\x03");
        p.extend(b"X\x01\x00\x00\x00bccollections\nOrderedDict\n)Rq\x04");
        p.extend(b"h\x01h\x03u.");
        p
    }

    #[test]
    fn ordinary_pickles_pass_and_parse() {
        let p = ordinary();
        scan(&p).unwrap();
        let Object::Dict(d) = candle(&p).unwrap() else {
            panic!("not a dict")
        };
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn every_truncation_is_refused_where_candle_fails() {
        // Agreement with candle: each prefix the scan accepts, candle parses, and vice versa.
        let p = ordinary();
        for n in 0..p.len() {
            let ours = scan(&p[..n]).is_ok();
            let theirs = candle(&p[..n]).is_ok();
            assert_eq!(ours, theirs, "prefix of {n} bytes");
        }
    }

    #[test]
    fn a_million_nested_tuples_are_refused_fast() {
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        let t = Instant::now();
        let e = scan(&p).unwrap_err().to_string();
        assert!(e.contains("nested more than 256 deep"), "{e}");
        assert!(e.contains("at byte 260"), "{e}");
        assert!(!e.contains('\n'));
        assert!(t.elapsed().as_secs_f64() < 5.0);
        // At the limit it passes, and candle builds (and drops) it.
        let mut ok = vec![0x80, 2, b'N'];
        ok.extend(std::iter::repeat_n(0x85u8, MAX_DEPTH as usize));
        ok.push(b'.');
        scan(&ok).unwrap();
        candle(&ok).unwrap();
    }

    #[test]
    fn memo_billion_laughs_is_refused() {
        // None, then 40 times: put it, get it twice, pair them.
        let mut p = vec![0x80, 2, b'N'];
        for _ in 0..40 {
            p.extend([b'q', 0, b'h', 0, b'h', 0, 0x86]);
        }
        p.push(b'.');
        assert!(p.len() < 300);
        let e = scan(&p).unwrap_err().to_string();
        assert!(e.contains("would build more than"), "{e}");
        // Each doubling doubles the cost: well before 40 the budget (16 MiB + 256 per byte)
        // runs out, at about 2^20 / 4 objects of NODE bytes.
        let byte: usize = e.rsplit("at byte ").next().unwrap().trim().parse().unwrap();
        assert!(byte < 7 * 22, "{e}");
    }

    #[test]
    fn trusted_arguments_are_checked() {
        // BINUNICODE declaring 4 GB in a few bytes.
        let e = scan(b"\x80\x02X\xff\xff\xff\xffab.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        // LONG1 of 200 bytes would overflow candle's shift.
        let mut p = vec![0x80, 2, 0x8a, 200];
        p.extend([1u8; 200]);
        p.push(b'.');
        let e = scan(&p).unwrap_err().to_string();
        assert!(e.contains("LONG1 of 200 bytes"), "{e}");
        // APPEND onto a tuple: candle would print the whole tuple into its error.
        let e = scan(b"\x80\x02)K\x01a.").unwrap_err().to_string();
        assert!(e.contains("not a list"), "{e}");
        let e = scan(b"\x80\x02\xfe.").unwrap_err().to_string();
        assert!(
            e.contains("unknown opcode 0xfe") && e.ends_with("at byte 2"),
            "{e}"
        );
    }
}
