//! Which plugins are asked about an MSR index, in file order.

/// Plugin positions (in manifest order) to ask, per MSR index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimTable {
    /// Disjoint, sorted `[first, last]` segments, each with the plugins to
    /// ask there (claimants and catch-alls, in file order).
    segments: Vec<(u32, u32, Vec<usize>)>,
    /// Plugins without a claim list: asked wherever no segment applies.
    catch_all: Vec<usize>,
}

impl ClaimTable {
    /// `claims[i]` is plugin i's claim list, `None` for a catch-all plugin.
    pub fn new(claims: &[Option<&[(u32, u32)]>]) -> Self {
        let catch_all: Vec<usize> = (0..claims.len()).filter(|&i| claims[i].is_none()).collect();
        let mut cuts: Vec<u64> = claims
            .iter()
            .flatten()
            .flat_map(|ranges| ranges.iter().flat_map(|&(f, l)| [u64::from(f), u64::from(l) + 1]))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut segments: Vec<(u32, u32, Vec<usize>)> = Vec::new();
        for pair in cuts.windows(2) {
            let (first, last) = (pair[0] as u32, (pair[1] - 1) as u32);
            let askers: Vec<usize> = (0..claims.len())
                .filter(|&i| match claims[i] {
                    None => true,
                    Some(ranges) => ranges.iter().any(|&(f, l)| f <= first && last <= l),
                })
                .collect();
            if askers == catch_all {
                continue;
            }
            match segments.last_mut() {
                Some(prev) if prev.1.checked_add(1) == Some(first) && prev.2 == askers => prev.1 = last,
                _ => segments.push((first, last, askers)),
            }
        }
        Self { segments, catch_all }
    }

    /// The plugins to ask about `index`, in file order.
    pub fn lookup(&self, index: u32) -> &[usize] {
        let at = self.segments.partition_point(|s| s.1 < index);
        match self.segments.get(at) {
            Some((first, _, askers)) if *first <= index => askers,
            _ => &self.catch_all,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_claims_chain_in_file_order() {
        let a = [(0x600, 0x61f)];
        let b = [(0x610, 0x610), (0x35, 0x35)];
        let t = ClaimTable::new(&[Some(&a), Some(&b)]);
        assert_eq!(t.lookup(0x606), [0]);
        assert_eq!(t.lookup(0x610), [0, 1]);
        assert_eq!(t.lookup(0x35), [1]);
        assert!(t.lookup(0x620).is_empty());
        assert!(t.lookup(0).is_empty());
        assert!(t.lookup(u32::MAX).is_empty());
    }

    #[test]
    fn catch_all_plugins_are_asked_everywhere_in_order() {
        let b = [(0x10, 0x10)];
        let t = ClaimTable::new(&[None, Some(&b), None]);
        assert_eq!(t.lookup(0x10), [0, 1, 2]);
        assert_eq!(t.lookup(0x11), [0, 2]);
        assert_eq!(t.lookup(u32::MAX), [0, 2]);
    }

    #[test]
    fn the_top_of_the_index_space_is_claimable() {
        let a = [(0xffff_fff0, u32::MAX)];
        let t = ClaimTable::new(&[Some(&a)]);
        assert_eq!(t.lookup(u32::MAX), [0]);
        assert!(t.lookup(0xffff_ffef).is_empty());
    }
}
