//! Turns the plugins' claims into a KVM MSR filter: claimed MSRs are denied
//! (so KVM deflects them to user space with reason FILTER), everything else
//! stays allowed.

use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

/// KVM accepts at most this many ranges in one filter.
pub const MAX_RANGES: usize = 16;
/// Largest bitmap KVM accepts per range, in bytes (`KVM_MSR_FILTER_MAX_BITMAP_SIZE`).
pub const MAX_BITMAP_BYTES: u32 = 0x600;
/// MSRs one range can cover.
pub const MAX_RANGE_MSRS: u32 = MAX_BITMAP_BYTES * 8;
/// KVM never filters the x2APIC MSRs.
pub const X2APIC: (u32, u32) = (0x800, 0x8ff);

/// A claim the filter cannot honour.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "plugin `{plugin}` claims {first:#x}-{last:#x}, which overlaps the x2APIC MSRs 0x800-0x8ff: KVM cannot filter them"
    )]
    X2apic { plugin: String, first: u32, last: u32 },
    #[error(
        "the claims need {needed} filter ranges of at most {MAX_RANGE_MSRS:#x} MSRs each, KVM allows {MAX_RANGES}: claim fewer or closer MSRs"
    )]
    TooManyRanges { needed: usize },
    #[error("KVM refused the MSR filter: {0}")]
    Kvm(String),
}

/// One KVM filter range: MSRs `base..base + count`, denied where the
/// bitmap bit is 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterWindow {
    pub base: u32,
    pub count: u32,
    pub bitmap: Vec<u8>,
}

/// The filter a set of claims needs; empty when nothing is claimed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterPlan {
    pub windows: Vec<FilterWindow>,
}

impl FilterPlan {
    /// `claims` pairs a plugin name with one of its inclusive ranges.
    pub fn build<'a>(claims: impl IntoIterator<Item = (&'a str, (u32, u32))>) -> Result<Self, FilterError> {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for (plugin, (first, last)) in claims {
            if first <= X2APIC.1 && last >= X2APIC.0 {
                return Err(FilterError::X2apic {
                    plugin: plugin.to_owned(),
                    first,
                    last,
                });
            }
            ranges.push((first, last));
        }
        ranges.sort_unstable();

        // Greedy left-to-right cover with windows of the largest width is
        // optimal for covering points on a line.
        let mut windows: Vec<FilterWindow> = Vec::new();
        for (first, last) in ranges {
            let mut next = u64::from(first);
            while next <= u64::from(last) {
                let fits = windows
                    .last()
                    .is_some_and(|w| next < u64::from(w.base) + u64::from(MAX_RANGE_MSRS));
                if !fits {
                    windows.push(FilterWindow {
                        base: next as u32,
                        count: 0,
                        bitmap: vec![0xff; MAX_BITMAP_BYTES as usize],
                    });
                }
                let w = windows.last_mut().expect("a window was just ensured");
                let end = (u64::from(w.base) + u64::from(MAX_RANGE_MSRS) - 1).min(u64::from(last));
                for msr in next..=end {
                    let bit = (msr - u64::from(w.base)) as usize;
                    w.bitmap[bit / 8] &= !(1 << (bit % 8));
                }
                w.count = w.count.max((end - u64::from(w.base) + 1) as u32);
                next = end + 1;
            }
        }
        if windows.len() > MAX_RANGES {
            return Err(FilterError::TooManyRanges { needed: windows.len() });
        }
        for w in &mut windows {
            w.bitmap.truncate(w.count.div_ceil(8) as usize);
        }
        Ok(Self { windows })
    }

    /// Is `index` deflected by this filter?
    pub fn denies(&self, index: u32) -> bool {
        self.windows.iter().any(|w| {
            let bit = index.wrapping_sub(w.base);
            index >= w.base && bit < w.count && w.bitmap[bit as usize / 8] & (1 << (bit % 8)) == 0
        })
    }

    /// Programs the filter into the VM (also on a running VM).
    pub fn apply(&self, vm: &VmFd) -> Result<(), FilterError> {
        let ranges: Vec<MsrFilterRange<'_>> = self
            .windows
            .iter()
            .map(|w| MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: w.base,
                msr_count: w.count,
                bitmap: &w.bitmap,
            })
            .collect();
        vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(|e| FilterError::Kvm(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearby_claims_share_one_window() {
        let plan = FilterPlan::build([("a", (0x606, 0x606)), ("a", (0x610, 0x61f)), ("b", (0x35, 0x35))]).unwrap();
        assert_eq!(plan.windows.len(), 1);
        for msr in [0x35, 0x606, 0x610, 0x61f] {
            assert!(plan.denies(msr), "{msr:#x}");
        }
        for msr in [0x34, 0x607, 0x620, 0xc000_0080] {
            assert!(!plan.denies(msr), "{msr:#x}");
        }
    }

    #[test]
    fn distant_claims_get_windows_and_seventeen_is_too_many() {
        let far: Vec<_> = (0..16u32).map(|i| ("p", (i * 0x10_0000, i * 0x10_0000))).collect();
        assert_eq!(FilterPlan::build(far.clone()).unwrap().windows.len(), 16);
        let mut more = far;
        more.push(("p", (0xf000_0000, 0xf000_0000)));
        assert_eq!(FilterPlan::build(more), Err(FilterError::TooManyRanges { needed: 17 }));
    }

    #[test]
    fn wide_claims_span_several_windows_and_reach_u32_max() {
        let plan = FilterPlan::build([("p", (0xffff_0000, u32::MAX))]).unwrap();
        assert_eq!(plan.windows.len(), 0x1_0000usize.div_ceil(MAX_RANGE_MSRS as usize));
        assert!(plan.denies(u32::MAX) && plan.denies(0xffff_0000) && !plan.denies(0xfffe_ffff));
        assert!(plan.windows.iter().all(|w| w.bitmap.len() <= MAX_BITMAP_BYTES as usize));
    }

    #[test]
    fn x2apic_claims_are_refused_by_name() {
        let e = FilterPlan::build([("apic", (0x7f0, 0x800))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "plugin `apic` claims 0x7f0-0x800, which overlaps the x2APIC MSRs 0x800-0x8ff: KVM cannot filter them"
        );
    }
}
