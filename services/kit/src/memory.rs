//! A worker's memory budget: what jobs may plan to use in this process, so that one job that
//! cannot fit is refused with its figure instead of taking the process (and every other job in
//! it) down.

/// The memory this process may plan on: `explicit_mib` when given (0 turns the check off), else
/// 80% of the smaller of the machine's memory and the cgroup's limit (a container's). `None` when
/// neither can be read.
pub fn budget_bytes(explicit_mib: Option<u64>) -> Option<u64> {
    match explicit_mib {
        Some(0) => None,
        Some(mib) => Some(mib << 20),
        None => {
            let limit = [mem_total(), cgroup_limit()].into_iter().flatten().min()?;
            Some(limit / 10 * 8)
        }
    }
}

fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kib << 10)
}

/// cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes` ("max" and huge values mean none).
fn cgroup_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    .find(|&b| b < 1 << 60)
}

/// `bytes` as GiB with one decimal, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// This process's resident memory (`VmRSS`), where `/proc` has it.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_budgets_win_and_zero_turns_the_check_off() {
        assert_eq!(budget_bytes(Some(512)), Some(512 << 20));
        assert_eq!(budget_bytes(Some(0)), None);
        // This machine has memory; the default is a share of it.
        let auto = budget_bytes(None).expect("/proc/meminfo is readable on Linux");
        assert!(auto > 64 << 20 && auto < mem_total().unwrap(), "{auto}");
        assert_eq!(gib(3 << 29), "1.5 GiB");
    }
}
