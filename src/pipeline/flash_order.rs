//! Flash order: which built devices may be flashed at the same time, and in which order.
//!
//! By default everything is one group in safe order: CAN nodes, USB/UART boards, USB-CAN
//! bridges, the linux-process MCU (a bridge carries the CAN bus, so its nodes go first).
//! With the setting `flash_parallel`, groups that share nothing run at the same time:
//! - each USB/UART board on its own port (boards registered on the same path share one);
//! - the linux-process MCU;
//! - the CAN group: the CAN nodes of one interface in order, then the bridges, last. The
//!   registry does not say which bridge carries which interface, so when there is a
//!   bridge, every CAN node and every bridge form one group; without a bridge each
//!   interface is its own group.
//!
//! Inside a group the order is the safe order, then registry order. `run` gives each group
//! its own scoped thread (one group: the caller's thread) and returns every result; a
//! panic in a group is re-raised once all groups have finished.
//!
//! Thread-safety: `groups` is pure; `run` calls `flash` from several threads at once.

use std::collections::BTreeMap;

use super::{Built, DeviceInfo, Link};
use crate::flash::Endpoint;

fn link(dev: &DeviceInfo) -> Link {
    dev.target.as_ref().map_or(Link::Serial, |t| t.link)
}

/// The flash groups: positions in `built`, each group in flashing order.
pub(super) fn groups(
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    parallel: bool,
) -> Vec<Vec<usize>> {
    let mut safe: Vec<usize> = (0..built.len()).collect();
    safe.sort_by_key(|&pos| link(&devices[built[pos].0]));
    if !parallel {
        return if safe.is_empty() { vec![] } else { vec![safe] };
    }
    let has_bridge = safe
        .iter()
        .any(|&pos| link(&devices[built[pos].0]) == Link::UsbCanBridge);
    // Keyed so that the groups come out in safe order too.
    let mut by_key: BTreeMap<(Link, String), Vec<usize>> = BTreeMap::new();
    for pos in safe {
        let dev = &devices[built[pos].0];
        let key = match (link(dev), &dev.endpoint) {
            (Link::Can | Link::UsbCanBridge, _) if has_bridge => (Link::Can, String::new()),
            (Link::Can, Endpoint::Can { interface, .. }) => (Link::Can, interface.clone()),
            (Link::Linux, _) => (Link::Linux, String::new()),
            (l, Endpoint::Serial { path } | Endpoint::Linux { path }) => (l, path.clone()),
            (l, Endpoint::Can { interface, .. }) => (l, interface.clone()),
        };
        by_key.entry(key).or_default().push(pos);
    }
    by_key.into_values().collect()
}

/// Run `flash(position, first_in_group)` for every position, the groups at the same
/// time; returns `(position, result)` for all of them.
pub(super) fn run<T: Send>(
    groups: &[Vec<usize>],
    flash: impl Fn(usize, bool) -> T + Sync,
) -> Vec<(usize, T)> {
    let one_group = |group: &Vec<usize>| -> Vec<(usize, T)> {
        group
            .iter()
            .enumerate()
            .map(|(n, &pos)| (pos, flash(pos, n == 0)))
            .collect()
    };
    if groups.len() <= 1 {
        return groups.iter().flat_map(one_group).collect();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter()
            .map(|group| scope.spawn(|| one_group(group)))
            .collect();
        let mut results = Vec::new();
        let mut panicked = None;
        for handle in handles {
            match handle.join() {
                Ok(done) => results.extend(done),
                Err(payload) => {
                    panicked.get_or_insert(payload);
                }
            }
        }
        if let Some(payload) = panicked {
            std::panic::resume_unwind(payload);
        }
        results
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash::Method;
    use crate::pipeline::Target;
    use std::path::PathBuf;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    fn dev(key: &str, link: Link, endpoint: Endpoint) -> DeviceInfo {
        DeviceInfo {
            key: key.into(),
            name: None,
            method: Method::Auto,
            endpoint,
            baud: None,
            mcu_section: format!("mcu {key}"),
            config: PathBuf::from("/c"),
            target: Ok(Target {
                mcu: "stm32f446xx".into(),
                link,
            }),
        }
    }
    fn serial(key: &str, path: &str) -> DeviceInfo {
        dev(key, Link::Serial, Endpoint::Serial { path: path.into() })
    }
    fn can(key: &str, interface: &str) -> DeviceInfo {
        let endpoint = Endpoint::Can {
            uuid: "0123456789ab".into(),
            interface: interface.into(),
        };
        dev(key, Link::Can, endpoint)
    }
    fn bridge(key: &str) -> DeviceInfo {
        let endpoint = Endpoint::Serial {
            path: format!("/dev/serial/by-id/{key}"),
        };
        dev(key, Link::UsbCanBridge, endpoint)
    }
    fn linux() -> DeviceInfo {
        let endpoint = Endpoint::Linux {
            path: "/tmp/klipper_host_mcu".into(),
        };
        dev("host", Link::Linux, endpoint)
    }

    fn keys(devices: &[DeviceInfo], parallel: bool) -> Vec<Vec<String>> {
        let built: Vec<(usize, Built)> = (0..devices.len())
            .map(|i| {
                let b = Built {
                    version: "v".into(),
                    out_dir: PathBuf::new(),
                    image: PathBuf::new(),
                    cached: false,
                };
                (i, b)
            })
            .collect();
        groups(devices, &built, parallel)
            .into_iter()
            .map(|g| g.into_iter().map(|p| devices[p].key.clone()).collect())
            .collect()
    }

    #[test]
    fn one_group_in_safe_order_by_default() {
        let devices = [
            linux(),
            bridge("u2c"),
            serial("main", "/a"),
            can("ebb", "can0"),
        ];
        assert_eq!(
            keys(&devices, false),
            [["ebb", "main", "u2c", "host"]],
            "CAN nodes, USB/UART boards, bridges, linux"
        );
    }

    #[test]
    fn parallel_groups_share_nothing_and_can_nodes_precede_their_bridge() {
        let devices = [
            linux(),
            bridge("u2c"),
            serial("main", "/dev/serial/by-id/main"),
            can("ebb", "can0"),
            serial("uart", "/dev/ttyAMA0"),
            can("sb2209", "can0"),
            serial("same-port", "/dev/ttyAMA0"),
        ];
        assert_eq!(
            keys(&devices, true),
            vec![
                vec!["ebb", "sb2209", "u2c"],
                vec!["main"],
                vec!["uart", "same-port"],
                vec!["host"],
            ]
        );
    }

    #[test]
    fn without_a_bridge_each_can_interface_is_its_own_group() {
        let devices = [can("a", "can0"), can("b", "can1"), can("c", "can0")];
        assert_eq!(keys(&devices, true), [vec!["a", "c"], vec!["b"]]);
    }

    #[test]
    fn groups_run_at_the_same_time_and_in_order_inside() {
        let groups = vec![vec![0, 1], vec![2], vec![3]];
        let log = Mutex::new(Vec::new());
        // The first device of every group waits until all three groups have begun: run
        // one after another, this would never happen.
        let begun = (Mutex::new(0_usize), Condvar::new());
        let results = run(&groups, |pos, first| {
            if first {
                let (count, cv) = &begun;
                let mut n = count.lock().unwrap();
                *n += 1;
                cv.notify_all();
                let (_n, waited) = cv
                    .wait_timeout_while(n, Duration::from_secs(20), |n| *n < 3)
                    .unwrap();
                assert!(
                    !waited.timed_out(),
                    "the groups did not run at the same time"
                );
            }
            log.lock().unwrap().push(pos);
            (pos, first)
        });
        let log = log.into_inner().unwrap();
        let at = |p| log.iter().position(|&x| x == p).unwrap();
        assert!(at(0) < at(1), "{log:?}");
        let mut results = results;
        results.sort_unstable();
        assert_eq!(
            results,
            [
                (0, (0, true)),
                (1, (1, false)),
                (2, (2, true)),
                (3, (3, true))
            ]
        );
    }

    #[test]
    fn a_panic_in_one_group_is_raised_after_the_others_finished() {
        let groups = vec![vec![0], vec![1]];
        let done = Mutex::new(Vec::new());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&groups, |pos, _| {
                assert!(pos != 0, "flasher bug");
                done.lock().unwrap().push(pos);
            })
        }));
        assert!(caught.is_err());
        assert_eq!(*done.lock().unwrap(), [1]);
    }
}
