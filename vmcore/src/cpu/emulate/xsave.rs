//! The XSAVE family on KVM's copy of the FPU state: KVM_GET_XSAVE hands out the state in the
//! standard XSAVE format (the "image"); XSAVE and XSAVEOPT copy it to the guest in the standard
//! format, XSAVEC and XSAVES in the compacted one, and XRSTOR(S) merge the guest's area (either
//! format) back into the image for KVM_SET_XSAVE, initializing what XSTATE_BV leaves out.
//!
//! Everything here is pure: byte buffers in, byte buffers out, so the layout rules are tested
//! without a VM.

use kvm_bindings::kvm_cpuid_entry2;

use super::Exception;

/// The legacy region (FXSAVE layout) and the XSAVE header that follows it.
pub(crate) const HEADER: usize = 512;
pub(crate) const EXTENDED: usize = 576;
pub(crate) const MXCSR: usize = 24;
const MXCSR_MASK: usize = 28;
const XMM: usize = 160;
pub(crate) const X87: u64 = 1 << 0;
pub(crate) const SSE: u64 = 1 << 1;
pub(crate) const AVX: u64 = 1 << 2;
const COMPACTED: u64 = 1 << 63;
const FCW_INIT: u16 = 0x037F;
const MXCSR_INIT: u32 = 0x1F80;

/// Where each state component lives, from CPUID leaf 0xD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Standard-format offset and size of components 2..63 (zero size: not enumerated).
    offset: [usize; 64],
    size: [usize; 64],
    /// Components aligned to 64 bytes in the compacted format (CPUID.(0xD,i).ECX[1]).
    align64: u64,
}

impl Layout {
    pub(crate) fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Layout {
        let mut layout = Layout { offset: [0; 64], size: [0; 64], align64: 0 };
        for e in entries.iter().filter(|e| e.function == 0xD && (2..63).contains(&e.index)) {
            let i = e.index as usize;
            layout.size[i] = e.eax as usize;
            layout.offset[i] = e.ebx as usize;
            if e.ecx & 2 != 0 {
                layout.align64 |= 1 << i;
            }
        }
        layout
    }

    /// The components this layout can place: x87, SSE and every enumerated extended one.
    pub(crate) fn known(&self) -> u64 {
        (2..63).filter(|&i| self.size[i] != 0).fold(X87 | SSE, |m, i| m | (1 << i))
    }

    /// Offsets of the extended components in the compacted format for `xcomp_bv`, and the
    /// total size of such an area.
    #[allow(clippy::needless_range_loop)] // the component number indexes several tables
    fn compacted(&self, xcomp_bv: u64) -> ([usize; 64], usize) {
        let mut offsets = [0; 64];
        let mut next = EXTENDED;
        for i in 2..63 {
            if xcomp_bv & (1 << i) == 0 {
                continue;
            }
            if self.align64 & (1 << i) != 0 {
                next = next.next_multiple_of(64);
            }
            offsets[i] = next;
            next += self.size[i];
        }
        (offsets, next)
    }

    /// The size of a standard-format area holding the components in `mask`.
    fn standard_size(&self, mask: u64) -> usize {
        (2..63).filter(|&i| mask & (1 << i) != 0).map(|i| self.offset[i] + self.size[i]).fold(EXTENDED, usize::max)
    }

    /// How many bytes of the guest's area an XRSTOR with this header reads.
    pub(crate) fn restore_size(&self, xstate_bv: u64, xcomp_bv: u64, rfbm: u64) -> usize {
        if xcomp_bv & COMPACTED != 0 {
            self.compacted(xcomp_bv).1
        } else {
            self.standard_size(rfbm & xstate_bv)
        }
    }
}

/// Which save instruction, as far as the layout is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SaveForm {
    /// XSAVE: every requested component, standard format.
    Standard,
    /// XSAVEOPT: standard format, components in their initial state skipped.
    StandardOptimized,
    /// XSAVEC and XSAVES: compacted format, components in their initial state skipped.
    Compacted,
}

/// The mode-dependent details of the legacy region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Legacy {
    /// REX.W (XSAVE64 and friends): 64-bit FPU instruction and data pointers; otherwise 32-bit
    /// offsets with (deprecated, zero) selectors.
    pub rex_w: bool,
    /// XMM registers that exist: 16 in 64-bit mode, 8 outside it.
    pub xmm_count: usize,
}

/// The pieces of the guest's XSAVE area a save writes, as (offset, bytes).
pub(crate) type Writes = Vec<(usize, Vec<u8>)>;

fn bit(mask: u64, i: usize) -> bool {
    mask & (1 << i) != 0
}

/// XSTATE_BV of a standard-format image (what KVM reports as in use: XINUSE).
pub(crate) fn xstate_bv(image: &[u8]) -> u64 {
    u64::from_le_bytes(image[HEADER..HEADER + 8].try_into().expect("8 bytes"))
}

/// Stores MXCSR in `image`, marking SSE state in use: KVM takes MXCSR from an image only with
/// SSE or AVX in XSTATE_BV (and SSE in its initial state would reset it to 0x1F80).
pub(crate) fn set_mxcsr(image: &mut [u8], mxcsr: u32) {
    image[MXCSR..MXCSR + 4].copy_from_slice(&mxcsr.to_le_bytes());
    let bv = xstate_bv(image) | SSE;
    image[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
}

/// The x87 part of the legacy region in its initial state: FCW 0x37F, everything else zero.
fn x87_init(out: &mut [u8]) {
    out[..MXCSR].fill(0);
    out[..2].copy_from_slice(&FCW_INIT.to_le_bytes());
    out[32..XMM].fill(0);
}

/// The x87 fields as the instruction form stores them: without REX.W the FPU instruction and
/// data pointers are 32-bit offsets followed by selectors, stored as zero (CPUs that deprecate
/// FCS and FDS do the same).
fn x87_pointers_for_form(region: &mut [u8], legacy: Legacy) {
    if !legacy.rex_w {
        region[12..16].fill(0);
        region[20..24].fill(0);
    }
}

/// Computes an XSAVE/XSAVEOPT/XSAVEC/XSAVES of `image` (standard format, from KVM) for the
/// requested-feature bitmap `rfbm`. `old_xstate_bv` is XSTATE_BV in the guest's area before the
/// standard forms, which keep its bits outside `rfbm`.
#[allow(clippy::needless_range_loop)] // the component number indexes several tables
pub(crate) fn save(layout: &Layout, image: &[u8], rfbm: u64, form: SaveForm, legacy: Legacy, old_xstate_bv: u64) -> Writes {
    let xinuse = xstate_bv(image);
    let skip_init = form != SaveForm::Standard;
    let saved = |i: usize| bit(rfbm, i) && (!skip_init || bit(xinuse, i));
    let mut writes = Writes::new();
    if saved(0) {
        let mut region = image[..XMM].to_vec();
        if !bit(xinuse, 0) {
            x87_init(&mut region);
        }
        x87_pointers_for_form(&mut region, legacy);
        writes.push((0, region[..MXCSR].to_vec()));
        writes.push((32, region[32..XMM].to_vec()));
    }
    // MXCSR (and its mask) go with SSE, and with AVX even without SSE; never init-optimized.
    if rfbm & (SSE | AVX) != 0 {
        writes.push((MXCSR, image[MXCSR..MXCSR + 8].to_vec()));
    }
    if saved(1) {
        let xmm = XMM..XMM + 16 * legacy.xmm_count;
        let bytes = if bit(xinuse, 1) { image[xmm].to_vec() } else { vec![0; 16 * legacy.xmm_count] };
        writes.push((XMM, bytes));
    }
    let compacted = form == SaveForm::Compacted;
    let offsets = if compacted { layout.compacted(rfbm).0 } else { layout.offset };
    for i in 2..63 {
        if !saved(i) || layout.size[i] == 0 {
            continue;
        }
        let src = layout.offset[i]..layout.offset[i] + layout.size[i];
        let bytes = if bit(xinuse, i) { image[src].to_vec() } else { vec![0; layout.size[i]] };
        writes.push((offsets[i], bytes));
    }
    let header = if compacted {
        let mut h = (xinuse & rfbm).to_le_bytes().to_vec();
        h.extend_from_slice(&(rfbm | COMPACTED).to_le_bytes());
        h
    } else {
        ((old_xstate_bv & !rfbm) | (xinuse & rfbm)).to_le_bytes().to_vec()
    };
    writes.push((HEADER, header));
    writes
}

/// Merges an XRSTOR (or, with `supervisor`, XRSTORS) from the guest's `area` into `image`.
/// `allowed` is XCR0 (or XCR0 | IA32_XSS) and `rfbm` the requested-feature bitmap. Raises the
/// #GP the instruction would for a malformed header or MXCSR; on success `image` holds the new
/// state and its XSTATE_BV says which components are no longer in their initial state.
pub(crate) fn restore(
    layout: &Layout,
    area: &[u8],
    image: &mut [u8],
    rfbm: u64,
    allowed: u64,
    supervisor: bool,
    legacy: Legacy,
) -> Result<(), Exception> {
    let word = |at: usize| u64::from_le_bytes(area[at..at + 8].try_into().expect("8 bytes"));
    let (bv, comp) = (word(HEADER), word(HEADER + 8));
    let compacted = comp & COMPACTED != 0;
    let gp = Err(Exception::gp(0));
    if (supervisor && !compacted) || bv & COMPACTED != 0 {
        return gp;
    }
    let offsets = if compacted {
        if comp & !COMPACTED & !allowed != 0 || bv & !comp != 0 || area[HEADER + 16..EXTENDED].iter().any(|&b| b != 0) {
            return gp;
        }
        layout.compacted(comp).0
    } else {
        if bv & !allowed != 0 || area[HEADER + 8..HEADER + 24].iter().any(|&b| b != 0) {
            return gp;
        }
        layout.offset
    };
    let mask = match u32::from_le_bytes(image[MXCSR_MASK..MXCSR_MASK + 4].try_into().expect("4 bytes")) {
        0 => 0xFFBF,
        m => m,
    };
    // The standard form loads MXCSR whenever SSE or AVX is requested; the compacted form only
    // with SSE data present, and initializes it when SSE is requested without data.
    let load_mxcsr = if compacted { bit(rfbm, 1) && bit(bv, 1) } else { rfbm & (SSE | AVX) != 0 };
    if load_mxcsr {
        let mxcsr = u32::from_le_bytes(area[MXCSR..MXCSR + 4].try_into().expect("4 bytes"));
        if mxcsr & !mask != 0 {
            return gp;
        }
        image[MXCSR..MXCSR + 4].copy_from_slice(&mxcsr.to_le_bytes());
    } else if compacted && bit(rfbm, 1) {
        image[MXCSR..MXCSR + 4].copy_from_slice(&MXCSR_INIT.to_le_bytes());
    }
    let mut new_bv = xstate_bv(image);
    // What the loop below does to SSE state must not lose a loaded MXCSR (see `set_mxcsr`).
    let keep_mxcsr = load_mxcsr && u32::from_le_bytes(image[MXCSR..MXCSR + 4].try_into().expect("4 bytes")) != MXCSR_INIT;
    for i in 0..63 {
        if !bit(rfbm, i) || (i >= 2 && layout.size[i] == 0) {
            continue;
        }
        let load = bit(bv, i);
        match i {
            0 => {
                if load {
                    image[..MXCSR].copy_from_slice(&area[..MXCSR]);
                    image[32..XMM].copy_from_slice(&area[32..XMM]);
                    if !legacy.rex_w {
                        // 32-bit pointers: the upper halves (selector fields) do not load.
                        image[12..16].fill(0);
                        image[20..24].fill(0);
                    }
                } else {
                    x87_init(&mut image[..XMM]);
                }
            }
            1 => {
                let xmm = XMM..XMM + 16 * legacy.xmm_count;
                if load {
                    image[xmm.clone()].copy_from_slice(&area[xmm]);
                } else {
                    image[xmm].fill(0);
                }
            }
            _ => {
                let dst = layout.offset[i]..layout.offset[i] + layout.size[i];
                if load {
                    image[dst].copy_from_slice(&area[offsets[i]..offsets[i] + layout.size[i]]);
                } else {
                    image[dst].fill(0);
                }
            }
        }
        if load {
            new_bv |= 1 << i;
        } else {
            new_bv &= !(1 << i);
        }
    }
    if keep_mxcsr {
        // Initialized XMM registers are zeros either way; only the tracking bit differs.
        new_bv |= SSE;
    }
    image[HEADER..HEADER + 8].copy_from_slice(&new_bv.to_le_bytes());
    // KVM takes the standard format only.
    image[HEADER + 8..EXTENDED].fill(0);
    Ok(())
}

/// Applies `writes` to a buffer (tests, and callers that want the whole area in memory).
#[cfg(test)]
pub(crate) fn apply(area: &mut [u8], writes: &Writes) {
    for (offset, bytes) in writes {
        area[*offset..offset + bytes.len()].copy_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of a CPU with AVX (component 2 at 576, 256 bytes), AVX-512 opmask (5, at
    /// 1088, 64 bytes) and an invented 64-byte-aligned component 7 of 24 bytes at 1152.
    fn layout() -> Layout {
        let entry = |index, eax, ebx, ecx| kvm_cpuid_entry2 { function: 0xD, index, eax, ebx, ecx, ..Default::default() };
        Layout::from_cpuid(&[entry(0, 0, 0, 0), entry(2, 256, 576, 0), entry(5, 64, 1088, 0), entry(7, 24, 1152, 2)])
    }

    const LEGACY64: Legacy = Legacy { rex_w: true, xmm_count: 16 };

    /// A standard image with recognizable bytes per component and XSTATE_BV `bv`.
    fn image(bv: u64) -> Vec<u8> {
        let mut img = vec![0u8; 4096];
        img[..2].copy_from_slice(&0x027Fu16.to_le_bytes()); // FCW
        img[2..4].copy_from_slice(&0x3800u16.to_le_bytes()); // FSW, TOP=7
        img[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes()); // FIP
        img[32..48].fill(0x87); // ST0
        img[MXCSR..MXCSR + 4].copy_from_slice(&0x1F00u32.to_le_bytes());
        img[MXCSR_MASK..MXCSR_MASK + 4].copy_from_slice(&0xFFFFu32.to_le_bytes());
        for r in 0..16 {
            img[XMM + 16 * r..XMM + 16 * (r + 1)].fill(0x10 + r as u8);
        }
        img[576..576 + 256].fill(0xA2);
        img[1088..1088 + 64].fill(0xA5);
        img[1152..1152 + 24].fill(0xA7);
        img[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
        img
    }

    #[test]
    fn compacted_offsets_pack_and_align() {
        let l = layout();
        assert_eq!(l.known(), 0b1010_0111);
        // All of 2, 5, 7: 576 (256 bytes), 832 (64), then 7 aligned up from 896 = 896 (24).
        let (off, size) = l.compacted(COMPACTED | 0b1010_0111);
        assert_eq!((off[2], off[5], off[7], size), (576, 832, 896, 920));
        // Only 5 and 7: 576, then 640 (already aligned).
        let (off, size) = l.compacted(COMPACTED | 0b1010_0000);
        assert_eq!((off[5], off[7], size), (576, 640, 664));
        // Only 2 and 7: 7 follows at 832 (a multiple of 64).
        assert_eq!(l.compacted(0b1000_0100).0[7], 832);
        assert_eq!(l.standard_size(0b100), 832);
        assert_eq!(l.standard_size(0b1000_0000), 1176);
        assert_eq!(l.standard_size(0b11), EXTENDED);
    }

    #[test]
    fn xsave_writes_every_requested_component_and_keeps_other_header_bits() {
        let l = layout();
        let img = image(0b11); // AVX in its initial state
        let mut area = vec![0xEEu8; 2048];
        let writes = save(&l, &img, 0b111, SaveForm::Standard, LEGACY64, 0x80 | 0x4);
        apply(&mut area, &writes);
        assert_eq!(area[..2], 0x027Fu16.to_le_bytes());
        assert_eq!(area[8..16], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(area[MXCSR..MXCSR + 4], 0x1F00u32.to_le_bytes());
        assert!(area[XMM + 16 * 15..XMM + 256].iter().all(|&b| b == 0x1F), "XMM15 in 64-bit mode");
        assert!(area[576..832].iter().all(|&b| b == 0), "AVX not in use: its initial state (zeros)");
        assert_eq!(xstate_bv(&area), 0x80 | 0b011, "bit 7 outside RFBM is kept, AVX bit cleared");
        assert!(area[416..512].iter().all(|&b| b == 0xEE), "bytes 416..511 are not written");
        assert!(area[HEADER + 8..HEADER + 16].iter().all(|&b| b == 0xEE), "XCOMP_BV is not written");
        assert!(area[1088..1152].iter().all(|&b| b == 0xEE), "components outside RFBM are not written");
    }

    #[test]
    fn xsaveopt_skips_components_in_their_initial_state() {
        let l = layout();
        let img = image(0b01);
        let mut area = vec![0xEEu8; 1024];
        apply(&mut area, &save(&l, &img, 0b111, SaveForm::StandardOptimized, LEGACY64, 0));
        assert!(area[XMM..XMM + 256].iter().all(|&b| b == 0xEE), "SSE not in use: XMM not written");
        assert_eq!(area[MXCSR..MXCSR + 4], 0x1F00u32.to_le_bytes(), "MXCSR always is");
        assert_eq!(xstate_bv(&area), 0b01);
    }

    #[test]
    fn thirty_two_bit_forms_store_eight_xmm_and_short_pointers() {
        let l = layout();
        let img = image(0b11);
        let mut area = vec![0xEEu8; 1024];
        apply(&mut area, &save(&l, &img, 0b11, SaveForm::Standard, Legacy { rex_w: false, xmm_count: 8 }, 0));
        assert_eq!(area[8..16], [0x88, 0x77, 0x66, 0x55, 0, 0, 0, 0]);
        assert!(area[XMM + 128..XMM + 256].iter().all(|&b| b == 0xEE), "XMM8-15 untouched");
    }

    #[test]
    fn xsavec_compacts_and_records_the_format() {
        let l = layout();
        let img = image(0b1010_0111);
        let mut area = vec![0u8; 1024];
        apply(&mut area, &save(&l, &img, 0b1010_0011, SaveForm::Compacted, LEGACY64, 0));
        // RFBM has 5 and 7 but not 2: 5 at 576, 7 at 640.
        assert!(area[576..640].iter().all(|&b| b == 0xA5));
        assert!(area[640..664].iter().all(|&b| b == 0xA7));
        assert_eq!(xstate_bv(&area), 0b1010_0011);
        assert_eq!(area[HEADER + 8..HEADER + 16], (COMPACTED | 0b1010_0011).to_le_bytes());
    }

    #[test]
    fn compacted_and_standard_round_trip_through_restore() {
        let l = layout();
        let img = image(0b1010_0111);
        for form in [SaveForm::Standard, SaveForm::Compacted] {
            let mut area = vec![0u8; 2048];
            apply(&mut area, &save(&l, &img, 0b1010_0111, form, LEGACY64, 0));
            let mut fresh = image(0);
            // Wipe the fresh image so everything must come from the area.
            fresh[..MXCSR_MASK].fill(0);
            fresh[32..HEADER].fill(0);
            fresh[EXTENDED..].fill(0);
            restore(&l, &area, &mut fresh, 0b1010_0111, 0b1010_0111, false, LEGACY64).unwrap();
            assert_eq!(fresh[..HEADER], img[..HEADER], "{form:?}: legacy region");
            assert_eq!(fresh[576..1176], img[576..1176], "{form:?}: extended region");
            assert_eq!(xstate_bv(&fresh), 0b1010_0111);
        }
    }

    #[test]
    fn restore_initializes_components_missing_from_xstate_bv() {
        let l = layout();
        let mut img = image(0b111);
        let mut area = vec![0u8; 1024];
        area[MXCSR..MXCSR + 4].copy_from_slice(&0x1F80u32.to_le_bytes());
        area[HEADER..HEADER + 8].copy_from_slice(&0u64.to_le_bytes());
        // Standard form, RFBM = x87|SSE only: both initialized, AVX (outside RFBM) kept.
        restore(&l, &area, &mut img, 0b011, 0b111, false, LEGACY64).unwrap();
        assert_eq!(img[..2], FCW_INIT.to_le_bytes());
        assert!(img[2..MXCSR].iter().all(|&b| b == 0));
        assert!(img[32..XMM + 256].iter().all(|&b| b == 0));
        assert_eq!(img[MXCSR..MXCSR + 4], 0x1F80u32.to_le_bytes(), "standard form loads MXCSR from memory");
        assert!(img[576..832].iter().all(|&b| b == 0xA2));
        assert_eq!(xstate_bv(&img), 0b100);
        // Compacted form with SSE requested but absent: MXCSR becomes 0x1F80 whatever memory says.
        let mut img = image(0b111);
        area[MXCSR..MXCSR + 4].copy_from_slice(&0x0000u32.to_le_bytes());
        area[HEADER + 8..HEADER + 16].copy_from_slice(&(COMPACTED | 0b11).to_le_bytes());
        restore(&l, &area, &mut img, 0b011, 0b111, false, LEGACY64).unwrap();
        assert_eq!(img[MXCSR..MXCSR + 4], MXCSR_INIT.to_le_bytes());
        assert_eq!(img[HEADER + 8..HEADER + 16], [0; 8], "the image stays in the standard format");
    }

    #[test]
    fn a_loaded_mxcsr_keeps_sse_marked_in_use() {
        let l = layout();
        let mut area = vec![0u8; 1024];
        area[MXCSR..MXCSR + 4].copy_from_slice(&0x1FC0u32.to_le_bytes());
        let mut img = image(0b111);
        restore(&l, &area, &mut img, 0b011, 0b111, false, LEGACY64).unwrap();
        assert_eq!(img[MXCSR..MXCSR + 4], 0x1FC0u32.to_le_bytes());
        assert!(img[XMM..XMM + 256].iter().all(|&b| b == 0), "XMM registers initialized");
        assert_eq!(xstate_bv(&img), 0b110, "SSE stays marked so KVM keeps MXCSR");
        let mut img = image(0);
        set_mxcsr(&mut img, 0x9FC0);
        assert_eq!((img[MXCSR..MXCSR + 4].to_vec(), xstate_bv(&img)), (0x9FC0u32.to_le_bytes().to_vec(), SSE));
    }

    #[test]
    fn restore_refuses_malformed_headers_with_gp() {
        let l = layout();
        let gp = Err(Exception::gp(0));
        let mut area = vec![0u8; 2048];
        let set = |area: &mut Vec<u8>, at: usize, v: u64| area[at..at + 8].copy_from_slice(&v.to_le_bytes());
        // Standard: XSTATE_BV beyond XCR0.
        set(&mut area, HEADER, 0b1000);
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, false, LEGACY64), gp);
        // Standard: bytes 16..23 of the header must be zero.
        set(&mut area, HEADER, 0b1);
        set(&mut area, HEADER + 16, 1);
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, false, LEGACY64), gp);
        set(&mut area, HEADER + 16, 0);
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, false, LEGACY64), Ok(()));
        // XRSTORS needs the compacted format.
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, true, LEGACY64), gp);
        // Compacted: XSTATE_BV must be a subset of XCOMP_BV, XCOMP_BV of what is allowed.
        set(&mut area, HEADER, 0b11);
        set(&mut area, HEADER + 8, COMPACTED | 0b01);
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, false, LEGACY64), gp);
        set(&mut area, HEADER + 8, COMPACTED | 0b1011);
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, false, LEGACY64), gp);
        set(&mut area, HEADER + 8, COMPACTED | 0b11);
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, true, LEGACY64), Ok(()));
        // Compacted: the rest of the header must be zero.
        area[HEADER + 40] = 1;
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, false, LEGACY64), gp);
        area[HEADER + 40] = 0;
        // Reserved MXCSR bits.
        area[MXCSR..MXCSR + 4].copy_from_slice(&0x1_0000u32.to_le_bytes());
        assert_eq!(restore(&l, &area, &mut image(0), 0b11, 0b111, false, LEGACY64), gp);
    }

    #[test]
    fn restore_reads_only_what_the_header_names() {
        let l = layout();
        assert_eq!(l.restore_size(0b111, 0, 0b111), 832);
        assert_eq!(l.restore_size(0b011, 0, 0b111), EXTENDED);
        assert_eq!(l.restore_size(0b111, COMPACTED | 0b1010_0111, 0b1), 920);
    }
}
