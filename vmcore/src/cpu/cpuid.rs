//! The CPUID table each vCPU gets: what KVM supports, with the per-vCPU APIC IDs filled in.

use kvm_bindings::CpuId;

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
