//! An object's unwind table: gimli over its `.eh_frame`, reduced to the rows the BPF unwinder
//! understands (docs/unwinding.md): per address range, how to find the CFA and the caller's rbp.
use anyhow::{Context, Result, bail};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, Reader, RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use object::elf::PF_X;
use object::{Object, ObjectSection, ObjectSegment, SegmentFlags};

use crate::skel::types::{unwind_cfa, unwind_rbp, unwind_rule};

/// A row's rule, hashable so that rules deduplicate over all objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rule {
    pub cfa: u8,
    pub rbp: u8,
    pub aux: u8,
    pub cfa_off: i32,
    pub rbp_off: i32,
}

impl Rule {
    /// No CFI: the BPF side walks the frame pointer. Always rule index 0.
    pub const NONE: Rule = Rule { cfa: unwind_cfa::UNW_CFA_NONE.0 as u8, rbp: 0, aux: 0, cfa_off: 0, rbp_off: 0 };
    const UNSUPPORTED: Rule =
        Rule { cfa: unwind_cfa::UNW_CFA_UNSUPPORTED.0 as u8, rbp: 0, aux: 0, cfa_off: 0, rbp_off: 0 };
    const END: Rule = Rule { cfa: unwind_cfa::UNW_CFA_END.0 as u8, rbp: 0, aux: 0, cfa_off: 0, rbp_off: 0 };

    pub fn to_bpf(self) -> unwind_rule {
        unwind_rule {
            cfa: self.cfa,
            rbp: self.rbp,
            aux: self.aux,
            pad: 0,
            cfa_off: self.cfa_off,
            rbp_off: self.rbp_off,
        }
    }
}

/// The table of one object: rules by ascending virtual address, each until the next row's
/// start; `end` closes the last. Gaps between FDEs carry [`Rule::NONE`].
#[derive(Debug, Clone, Default)]
pub struct ObjectTable {
    pub rows: Vec<(u64, Rule)>,
    pub end: u64,
    /// p_vaddr - p_offset of the executable PT_LOAD: turns file offsets into addresses.
    pub vaddr_minus_offset: i64,
    /// Bytes of code whose rule is outside the model (another CFA register, an expression).
    pub unsupported_bytes: u64,
}

const RSP: gimli::Register = X86_64::RSP;
const RBP: gimli::Register = X86_64::RBP;
const RA: gimli::Register = X86_64::RA;

/// Builds the table of an ELF object from its bytes.
pub fn build(data: &[u8]) -> Result<ObjectTable> {
    let file = object::File::parse(data).context("not an ELF object")?;
    let exec = file
        .segments()
        .find(|s| matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0))
        .context("no executable segment")?;
    let vaddr_minus_offset = exec.address() as i64 - exec.file_range().0 as i64;
    let Some(section) = file.section_by_name(".eh_frame") else {
        return Ok(ObjectTable { vaddr_minus_offset, ..Default::default() });
    };
    let bytes = section.uncompressed_data().context("reading .eh_frame")?;
    let mut eh = EhFrame::new(&bytes, LittleEndian);
    eh.set_address_size(8);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    if let Some(hdr) = file.section_by_name(".eh_frame_hdr") {
        bases = bases.set_eh_frame_hdr(hdr.address());
    }

    // (start, end, rule) of every CFI row.
    let mut spans: Vec<(u64, u64, Rule)> = Vec::new();
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = eh.entries(&bases);
    let mut unsupported_bytes = 0;
    while let Some(entry) = entries.next().context("parsing .eh_frame")? {
        let CieOrFde::Fde(partial) = entry else { continue };
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else { continue };
        let Ok(mut table) = fde.rows(&eh, &bases, &mut ctx) else { continue };
        while let Ok(Some(row)) = table.next_row() {
            let (start, end) = (row.start_address(), row.end_address());
            if end <= start {
                continue;
            }
            let rule = rule_of(&eh, row.cfa(), row.register(RBP), row.register(RA));
            if rule == Rule::UNSUPPORTED {
                unsupported_bytes += end - start;
            }
            spans.push((start, end, rule));
        }
    }
    Ok(ObjectTable { vaddr_minus_offset, unsupported_bytes, ..cover(spans) })
}

/// Sorted rows without overlaps, gaps filled with [`Rule::NONE`], equal neighbours merged.
fn cover(mut spans: Vec<(u64, u64, Rule)>) -> ObjectTable {
    spans.sort_by_key(|s| (s.0, s.1));
    let mut rows: Vec<(u64, Rule)> = Vec::with_capacity(spans.len());
    let mut end = 0u64;
    for (start, stop, rule) in spans {
        if stop <= end {
            continue; // inside a range already covered
        }
        let start = start.max(end);
        if !rows.is_empty() && start > end {
            rows.push((end, Rule::NONE));
        }
        if rows.last().is_none_or(|r| r.1 != rule) {
            rows.push((start, rule));
        }
        end = stop;
    }
    ObjectTable { rows, end, ..Default::default() }
}

fn rule_of<R: Reader>(
    eh: &EhFrame<R>,
    cfa: &CfaRule<R::Offset>,
    rbp: Option<RegisterRule<R::Offset>>,
    ra: Option<RegisterRule<R::Offset>>,
) -> Rule {
    match ra {
        Some(RegisterRule::Undefined) => return Rule::END,
        None | Some(RegisterRule::Offset(-8)) => {}
        Some(_) => return Rule::UNSUPPORTED,
    }
    let mut rule = match *cfa {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(off) = i32::try_from(offset) else { return Rule::UNSUPPORTED };
            let cfa = match register {
                RSP => unwind_cfa::UNW_CFA_RSP,
                RBP => unwind_cfa::UNW_CFA_RBP,
                _ => return Rule::UNSUPPORTED,
            };
            Rule { cfa: cfa.0 as u8, cfa_off: off, ..Rule::default() }
        }
        CfaRule::Expression(ref e) => match e.get(eh).ok().and_then(|e| plt_rule(e.0.to_slice().ok()?.as_ref())) {
            Some(r) => r,
            None => return Rule::UNSUPPORTED,
        },
    };
    match rbp {
        None | Some(RegisterRule::SameValue) => rule.rbp = unwind_rbp::UNW_RBP_SAME.0 as u8,
        Some(RegisterRule::Undefined) => rule.rbp = unwind_rbp::UNW_RBP_UNDEFINED.0 as u8,
        Some(RegisterRule::Offset(off)) => {
            let Ok(off) = i32::try_from(off) else { return Rule::UNSUPPORTED };
            rule.rbp = unwind_rbp::UNW_RBP_AT_CFA.0 as u8;
            rule.rbp_off = off;
        }
        Some(_) => return Rule::UNSUPPORTED,
    }
    Some(rule).filter(|r| r.cfa != 0).unwrap_or(Rule::UNSUPPORTED)
}

/// The expression linkers emit for PLT entries: CFA = rsp + N, plus 8 once the entry has pushed
/// its index, i.e. when (rip & 15) >= K:
/// `DW_OP_breg7 N; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_litK; DW_OP_ge;
///  DW_OP_lit3; DW_OP_shl; DW_OP_plus`.
fn plt_rule(expr: &[u8]) -> Option<Rule> {
    let (&op, rest) = expr.split_first()?;
    if op != 0x77 {
        return None; // DW_OP_breg7
    }
    let (n, rest) = sleb128(rest)?;
    match rest {
        [0x80, 0x00, 0x3f, 0x1a, k @ 0x30..=0x4f, 0x2a, 0x33, 0x24, 0x22] => Some(Rule {
            cfa: unwind_cfa::UNW_CFA_PLT.0 as u8,
            aux: k - 0x30,
            cfa_off: i32::try_from(n).ok()?,
            ..Rule::default()
        }),
        _ => None,
    }
}

fn sleb128(mut bytes: &[u8]) -> Option<(i64, &[u8])> {
    let (mut value, mut shift) = (0i64, 0u32);
    loop {
        let (&b, rest) = bytes.split_first()?;
        bytes = rest;
        if shift < 64 {
            value |= i64::from(b & 0x7f) << shift;
        }
        shift += 7;
        if b & 0x80 == 0 {
            if shift < 64 && b & 0x40 != 0 {
                value |= -1i64 << shift;
            }
            return Some((value, bytes));
        }
    }
}

/// The rows of each 64 KiB page of the table, each page starting with a row at offset 0.
pub fn pages(t: &ObjectTable, page_shift: u32) -> Result<(u64, Vec<Vec<u32>>, Vec<Rule>)> {
    let Some(&(first, _)) = t.rows.first() else { return Ok((0, Vec::new(), Vec::new())) };
    let first_page = first >> page_shift;
    let last_page = (t.end - 1) >> page_shift;
    if last_page - first_page > u32::MAX as u64 {
        bail!("code spans too many pages");
    }
    // Rules in the order met, the row refers to them by position; the caller maps to indices.
    let mut rules: Vec<Rule> = Vec::new();
    let mut rule_pos = std::collections::HashMap::new();
    let mut pages = vec![Vec::new(); (last_page - first_page + 1) as usize];
    let mask = (1u64 << page_shift) - 1;
    let mut pos_of = |r: Rule| -> u32 {
        *rule_pos.entry(r).or_insert_with(|| {
            rules.push(r);
            rules.len() as u32 - 1
        })
    };
    let mut i = 0;
    for (p, page) in pages.iter_mut().enumerate() {
        let base = (first_page + p as u64) << page_shift;
        while i + 1 < t.rows.len() && t.rows[i + 1].0 <= base {
            i += 1;
        }
        // The row in effect at the page's start, then those starting inside it.
        let mut j = i;
        if t.rows[j].0 <= base {
            page.push(pos_of(t.rows[j].1));
            j += 1;
        } else {
            page.push(pos_of(Rule::NONE));
        }
        while j < t.rows.len() && t.rows[j].0 <= base + mask {
            page.push((((t.rows[j].0 & mask) as u32) << 16) | pos_of(t.rows[j].1));
            j += 1;
        }
        if base + mask >= t.end && t.end & mask != 0 {
            page.push((((t.end & mask) as u32) << 16) | pos_of(Rule::NONE));
        }
    }
    Ok((first_page, pages, rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsp(off: i32) -> Rule {
        Rule { cfa: unwind_cfa::UNW_CFA_RSP.0 as u8, cfa_off: off, ..Rule::default() }
    }

    #[test]
    fn rows_cover_gaps_and_merge() {
        let t = cover(vec![
            (0x1000, 0x1004, rsp(8)),
            (0x1004, 0x1010, rsp(16)),
            (0x1010, 0x1020, rsp(16)),
            (0x1030, 0x1040, rsp(8)),
        ]);
        assert_eq!(t.rows, vec![(0x1000, rsp(8)), (0x1004, rsp(16)), (0x1020, Rule::NONE), (0x1030, rsp(8))]);
        assert_eq!(t.end, 0x1040);
    }

    #[test]
    fn pages_start_with_the_rule_in_effect() {
        let t = ObjectTable { rows: vec![(0xfff0, rsp(8)), (0x10008, rsp(16))], end: 0x10010, ..Default::default() };
        let (first, pages, rules) = pages(&t, 16).unwrap();
        assert_eq!(first, 0);
        assert_eq!(rules, vec![Rule::NONE, rsp(8), rsp(16)]);
        assert_eq!(pages[0], vec![0, 0xfff0 << 16 | 1]);
        assert_eq!(pages[1], vec![1, 0x8 << 16 | 2, 0x10 << 16]);
    }

    #[test]
    fn recognizes_the_plt_expression() {
        let e = [0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22];
        let r = plt_rule(&e).expect("PLT rule");
        assert_eq!((r.cfa, r.cfa_off, r.aux), (unwind_cfa::UNW_CFA_PLT.0 as u8, 8, 11));
        assert!(plt_rule(&e[..10]).is_none());
    }

    #[test]
    fn libc_table_is_mostly_in_the_model() {
        let data = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").expect("Debian's libc");
        let t = build(&data).expect("table");
        assert!(t.rows.len() > 10_000, "{} rows", t.rows.len());
        assert!(t.unsupported_bytes < 4096, "{} bytes unsupported", t.unsupported_bytes);
    }
}
