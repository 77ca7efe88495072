//! The CPUID table each vCPU gets: what KVM supports, with the per-vCPU APIC IDs filled in.

use std::sync::OnceLock;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::{Error, Result};

/// What KVM can offer guests. It cannot change while the process lives, and asking costs
/// about as much as creating the rest of a small VM, so it is asked once.
pub fn supported(kvm: &Kvm) -> Result<&'static CpuId> {
    static SUPPORTED: OnceLock<CpuId> = OnceLock::new();
    if let Some(table) = SUPPORTED.get() {
        return Ok(table);
    }
    let table = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("GET_SUPPORTED_CPUID"))?;
    Ok(SUPPORTED.get_or_init(|| table))
}

/// Adjusts KVM's supported table for vCPU `index` of `count`.
pub fn for_vcpu(supported: &CpuId, index: usize, count: usize) -> CpuId {
    let mut table = supported.clone();
    for entry in table.as_mut_slice() {
        match entry.function {
            // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            1 => {
                entry.ebx = (entry.ebx & 0x0000_FFFF) | ((index as u32) << 24) | ((count.min(255) as u32) << 16);
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the count above is meaningful
                }
            }
            // Extended topology leaves report the x2APIC ID in EDX.
            0xB | 0x1F => entry.edx = index as u32,
            _ => {}
        }
    }
    table
}
