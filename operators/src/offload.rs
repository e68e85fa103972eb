//! Where each activated expert outside the fast tier is computed, step by step (Fiddler's
//! decision, made over the whole step).
//!
//! An expert whose weights sit in a slow tier can be computed *where its weights are*, by a
//! lane that reads that tier in place (a CPU lane over DRAM), or its weights can be *moved*
//! over a link to the lane that runs the rest of the layer (DRAM → GPU), and computed there.
//! Fiddler compares the two for each expert on its own; but every expert computed in place
//! queues on the same CPU lane, and every moved one on the same link, so per-expert choices
//! can each look right while the step waits on one overloaded lane. [`decide`] chooses for all
//! the step's experts at once, minimising the step's *makespan*: when the slowest lane
//! finishes, a moved expert's compute starting only once its transfer has arrived.
//!
//! Costs are measured, not assumed: [`LaneCost`] (fixed + per-token seconds for one expert on
//! a lane) and [`LinkCost`] (seconds to move one expert's weights over a link) come from
//! timing the real kernels and reads on the machine at start-up. Nothing here knows which
//! device a lane is: any tiers, any lanes.

/// One lane's cost of computing one expert: `fixed_s + per_token_s × tokens` seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneCost {
    pub name: String,
    pub fixed_s: f64,
    pub per_token_s: f64,
    /// Work already on this lane in the step (experts resident there, the rest of the layer).
    pub busy_s: f64,
    /// The tiers whose weights this lane computes on in place.
    pub reads: Vec<usize>,
}

impl LaneCost {
    /// Seconds to compute one expert over `tokens` tokens.
    pub fn compute_s(&self, tokens: usize) -> f64 {
        self.fixed_s + self.per_token_s * tokens as f64
    }
}

/// Moving one expert's weights from tier `from` to lane `to`: `per_expert_s` seconds on the
/// link (transfers over one link run one after another).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkCost {
    pub from: usize,
    pub to: usize,
    pub per_expert_s: f64,
}

/// A step's costs: lanes and links.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Costs {
    pub lanes: Vec<LaneCost>,
    pub links: Vec<LinkCost>,
}

/// An expert the router chose this step, outside the fast tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Active {
    pub expert: usize,
    /// Tokens routed to it this step.
    pub tokens: usize,
    /// The tier its weights are in.
    pub tier: usize,
}

/// Where one expert runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// On lane `lane`, over its weights where they are.
    InPlace { lane: usize },
    /// Its weights moved over link `link`, computed on that link's lane.
    Moved { link: usize },
}

/// The choice for every expert of the step, in the order given, and the makespan it gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub choices: Vec<Choice>,
    pub makespan_s: f64,
    /// Seconds of transfer the choices put on links (less is better among equal makespans).
    pub moved_s: f64,
}

/// Errors in the costs given.
#[derive(Debug, Clone, PartialEq)]
pub enum DecideError {
    /// No lane reads the expert's tier and no link moves it anywhere.
    Unreachable { expert: usize, tier: usize },
    /// A cost is negative or not a number.
    BadCost(String),
}

impl std::fmt::Display for DecideError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecideError::Unreachable { expert, tier } => {
                write!(f, "expert {expert} is in tier {tier}, which no lane reads and no link leaves")
            }
            DecideError::BadCost(s) => write!(f, "bad cost: {s}"),
        }
    }
}

impl std::error::Error for DecideError {}

/// Above this many combinations the search is greedy with local improvement, not exhaustive.
const EXHAUSTIVE_MAX: usize = 1 << 14;

/// The options of one expert: computing in place on every lane that reads its tier (first,
/// in lane order), then moving it over every link that leaves its tier (in link order).
fn options(a: &Active, costs: &Costs) -> Vec<Choice> {
    let in_place =
        (0..costs.lanes.len()).filter(|&l| costs.lanes[l].reads.contains(&a.tier)).map(|lane| Choice::InPlace { lane });
    let moved = (0..costs.links.len()).filter(|&k| costs.links[k].from == a.tier).map(|link| Choice::Moved { link });
    in_place.chain(moved).collect()
}

/// The makespan and the transfer seconds of `choices`. Each lane first runs its own work and
/// the experts it computes in place (all available at once), then the experts moved to it as
/// they arrive; a link moves its experts one after another, the longest to compute first (so
/// the lane's last wait is for the shortest).
pub fn makespan(active: &[Active], choices: &[Choice], costs: &Costs) -> (f64, f64) {
    let nl = costs.lanes.len();
    let mut finish: Vec<f64> = costs.lanes.iter().map(|l| l.busy_s).collect();
    let mut moved: Vec<Vec<(f64, usize)>> = vec![Vec::new(); costs.links.len()]; // per link: (compute on its lane, index)
    let mut moved_s = 0.0;
    for (a, c) in active.iter().zip(choices) {
        match *c {
            Choice::InPlace { lane } => finish[lane] += costs.lanes[lane].compute_s(a.tokens),
            Choice::Moved { link } => {
                let lane = costs.links[link].to;
                let order = moved[link].len();
                moved[link].push((costs.lanes[lane].compute_s(a.tokens), order));
                moved_s += costs.links[link].per_expert_s;
            }
        }
    }
    // Arrivals per lane from all links, each link in its own order.
    let mut arrivals: Vec<Vec<(f64, f64)>> = vec![Vec::new(); nl]; // (arrival, compute)
    for (k, jobs) in moved.iter_mut().enumerate() {
        jobs.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let mut t = 0.0;
        for &(c, _) in jobs.iter() {
            t += costs.links[k].per_expert_s;
            arrivals[costs.links[k].to].push((t, c));
        }
    }
    for (l, arr) in arrivals.iter_mut().enumerate() {
        arr.sort_by(|x, y| x.0.total_cmp(&y.0));
        for &(at, c) in arr.iter() {
            finish[l] = finish[l].max(at) + c;
        }
    }
    (finish.iter().copied().fold(0.0, f64::max), moved_s)
}

/// Whether (makespan, moved) `a` beats `b`: a shorter makespan, then less moved (computing
/// where the weights are frees the link and the memory a copy takes). Differences within a
/// nanosecond are ties.
fn better(a: (f64, f64), b: (f64, f64)) -> bool {
    const EPS: f64 = 1e-9;
    if a.0 < b.0 - EPS {
        return true;
    }
    a.0 <= b.0 + EPS && a.1 < b.1 - EPS
}

/// Chooses, for every expert of `active`, where it runs so that the step's makespan is least;
/// among choices with the same makespan, the one that moves least, then the first in the
/// order of `options` (in place before moved, lower lane and link first). Exhaustive up to
/// a few thousand combinations, otherwise greedy (largest experts first, each to its best
/// option) followed by single-expert moves while any improves.
pub fn decide(active: &[Active], costs: &Costs) -> Result<Decision, DecideError> {
    for l in &costs.lanes {
        for (what, v) in [("fixed_s", l.fixed_s), ("per_token_s", l.per_token_s), ("busy_s", l.busy_s)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(DecideError::BadCost(format!("lane `{}`: {what} = {v}", l.name)));
            }
        }
    }
    for (k, l) in costs.links.iter().enumerate() {
        if !(l.per_expert_s >= 0.0 && l.per_expert_s.is_finite()) || l.to >= costs.lanes.len() {
            return Err(DecideError::BadCost(format!("link {k}: {} s to lane {}", l.per_expert_s, l.to)));
        }
    }
    let opts: Vec<Vec<Choice>> = active.iter().map(|a| options(a, costs)).collect();
    if let Some((a, _)) = active.iter().zip(&opts).find(|(_, o)| o.is_empty()) {
        return Err(DecideError::Unreachable { expert: a.expert, tier: a.tier });
    }
    let combos = opts.iter().try_fold(1usize, |acc, o| acc.checked_mul(o.len()).filter(|&c| c <= EXHAUSTIVE_MAX));
    let choices = match combos {
        Some(n) => exhaustive(active, &opts, costs, n),
        None => greedy(active, &opts, costs),
    };
    let (makespan_s, moved_s) = makespan(active, &choices, costs);
    Ok(Decision { choices, makespan_s, moved_s })
}

fn exhaustive(active: &[Active], opts: &[Vec<Choice>], costs: &Costs, combos: usize) -> Vec<Choice> {
    let mut best: Option<(Vec<Choice>, (f64, f64))> = None;
    let mut pick = vec![0usize; opts.len()];
    for _ in 0..combos {
        let choices: Vec<Choice> = pick.iter().zip(opts).map(|(&i, o)| o[i]).collect();
        let score = makespan(active, &choices, costs);
        // Combinations come in lexicographic order of option index (the first expert's
        // option varies slowest), so keeping the first of equals keeps the order's preference.
        if best.as_ref().is_none_or(|(_, s)| better(score, *s)) {
            best = Some((choices, score));
        }
        for j in (0..pick.len()).rev() {
            pick[j] += 1;
            if pick[j] < opts[j].len() {
                break;
            }
            pick[j] = 0;
        }
    }
    best.map(|(c, _)| c).unwrap_or_default()
}

fn greedy(active: &[Active], opts: &[Vec<Choice>], costs: &Costs) -> Vec<Choice> {
    let mut order: Vec<usize> = (0..active.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(active[i].tokens), i));
    let mut chosen: Vec<Option<Choice>> = vec![None; active.len()];
    for &i in &order {
        let mut best: Option<(Choice, (f64, f64))> = None;
        for &o in &opts[i] {
            chosen[i] = Some(o);
            let (sub_a, sub_c): (Vec<Active>, Vec<Choice>) =
                active.iter().zip(&chosen).filter_map(|(a, c)| c.map(|c| (*a, c))).unzip();
            let score = makespan(&sub_a, &sub_c, costs);
            if best.as_ref().is_none_or(|(_, s)| better(score, *s)) {
                best = Some((o, score));
            }
        }
        chosen[i] = best.map(|(o, _)| o);
    }
    let mut choices: Vec<Choice> = chosen.into_iter().map(|c| c.expect("every expert has an option")).collect();
    let mut score = makespan(active, &choices, costs);
    loop {
        let mut improved = false;
        for i in 0..active.len() {
            for &o in &opts[i] {
                let old = choices[i];
                choices[i] = o;
                let s = makespan(active, &choices, costs);
                if better(s, score) {
                    score = s;
                    improved = true;
                } else {
                    choices[i] = old;
                }
            }
        }
        if !improved {
            return choices;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAM: usize = 0;
    const DISK: usize = 1;

    /// Lane 0: a GPU that reads only its own memory (tier 9); lane 1: a CPU that reads DRAM.
    /// One link DRAM → GPU. All made-up numbers.
    fn gpu_cpu(cpu_per_token: f64, gpu_per_token: f64, move_s: f64) -> Costs {
        Costs {
            lanes: vec![
                LaneCost { name: "gpu".into(), fixed_s: 0.0, per_token_s: gpu_per_token, busy_s: 0.0, reads: vec![9] },
                LaneCost {
                    name: "cpu".into(),
                    fixed_s: 0.0,
                    per_token_s: cpu_per_token,
                    busy_s: 0.0,
                    reads: vec![DRAM],
                },
            ],
            links: vec![LinkCost { from: DRAM, to: 0, per_expert_s: move_s }],
        }
    }

    fn one(tokens: usize) -> Vec<Active> {
        vec![Active { expert: 3, tokens, tier: DRAM }]
    }

    #[test]
    fn batch_size_crossover_one_expert() {
        // In place: 1 ms/token on the CPU. Moved: 20 ms transfer + 0.05 ms/token on the GPU.
        // Equal at n = 20 / 0.95 = 21.05 tokens.
        let c = gpu_cpu(1e-3, 5e-5, 20e-3);
        for n in [1, 5, 20, 21] {
            let d = decide(&one(n), &c).unwrap();
            assert_eq!(d.choices, vec![Choice::InPlace { lane: 1 }], "{n} tokens");
            assert!((d.makespan_s - n as f64 * 1e-3).abs() < 1e-12);
        }
        for n in [22, 64, 256] {
            let d = decide(&one(n), &c).unwrap();
            assert_eq!(d.choices, vec![Choice::Moved { link: 0 }], "{n} tokens");
            assert!((d.makespan_s - (20e-3 + n as f64 * 5e-5)).abs() < 1e-12);
            assert!((d.moved_s - 20e-3).abs() < 1e-15);
        }
    }

    #[test]
    fn a_tie_keeps_the_weights_where_they_are() {
        // 10 tokens: 10 ms in place, 5 ms + 10 × 0.5 ms moved — equal.
        let c = gpu_cpu(1e-3, 5e-4, 5e-3);
        let d = decide(&one(10), &c).unwrap();
        assert_eq!(d.choices, vec![Choice::InPlace { lane: 1 }]);
        assert_eq!(d.moved_s, 0.0);
        // Two equal experts, where moving exactly one is best: the first stays, the second moves.
        let c = gpu_cpu(1e-3, 0.0, 12e-3);
        let two = vec![Active { expert: 0, tokens: 10, tier: DRAM }, Active { expert: 1, tokens: 10, tier: DRAM }];
        let d = decide(&two, &c).unwrap();
        assert_eq!(d.choices, vec![Choice::InPlace { lane: 1 }, Choice::Moved { link: 0 }]);
        assert!((d.makespan_s - 12e-3).abs() < 1e-12);
    }

    #[test]
    fn the_step_not_each_expert_decides() {
        // Each of 4 experts alone is cheaper in place (15 ms vs 20.75 ms moved), which is what a
        // per-expert rule picks: 60 ms of CPU work. Over the step, moving two of them overlaps
        // transfers with the CPU: makespan max(30, 20 + 0.75 + 20 + 0.75 …) is far less.
        let c = gpu_cpu(1e-3, 5e-5, 20e-3);
        let four: Vec<Active> = (0..4).map(|e| Active { expert: e, tokens: 15, tier: DRAM }).collect();
        let per_expert: Vec<Choice> = vec![Choice::InPlace { lane: 1 }; 4];
        let (alone, _) = makespan(&four, &per_expert, &c);
        assert!((alone - 60e-3).abs() < 1e-12);
        let d = decide(&four, &c).unwrap();
        assert!(d.makespan_s < alone * 0.75, "{d:?}");
        let moved = d.choices.iter().filter(|c| matches!(c, Choice::Moved { .. })).count();
        assert!((1..4).contains(&moved), "{d:?}");
        // The chosen makespan is the least over all 16 combinations.
        for mask in 0..16u32 {
            let ch: Vec<Choice> = (0..4)
                .map(|i| if mask >> i & 1 == 1 { Choice::Moved { link: 0 } } else { Choice::InPlace { lane: 1 } })
                .collect();
            assert!(makespan(&four, &ch, &c).0 >= d.makespan_s - 1e-12);
        }
    }

    #[test]
    fn a_busy_lane_pushes_experts_away() {
        // The GPU already has 50 ms of resident work: a 30-token expert moved there would end at
        // 50 + 30 × 0.05 ms, later than 30 ms in place on the CPU, though moving is faster alone.
        let mut c = gpu_cpu(1e-3, 5e-5, 20e-3);
        assert_eq!(decide(&one(30), &c).unwrap().choices, vec![Choice::Moved { link: 0 }]);
        c.lanes[0].busy_s = 50e-3;
        assert_eq!(decide(&one(30), &c).unwrap().choices, vec![Choice::InPlace { lane: 1 }]);
    }

    #[test]
    fn a_moved_expert_waits_for_its_transfer() {
        // Transfer 10 ms, GPU compute 1 ms, GPU busy 4 ms: it finishes at 11 ms, not 5.
        let mut c = gpu_cpu(1.0, 1e-3, 10e-3);
        c.lanes[0].busy_s = 4e-3;
        let (m, _) = makespan(&one(1), &[Choice::Moved { link: 0 }], &c);
        assert!((m - 11e-3).abs() < 1e-12);
    }

    #[test]
    fn weights_on_disk_have_only_the_links_that_leave_it() {
        // This machine's shape: a CPU lane over DRAM; experts on disk must be read into DRAM
        // (the link's lane is the CPU). Options: the link only.
        let c = Costs {
            lanes: vec![LaneCost {
                name: "cpu".into(),
                fixed_s: 1e-4,
                per_token_s: 2e-3,
                busy_s: 0.0,
                reads: vec![DRAM],
            }],
            links: vec![LinkCost { from: DISK, to: 0, per_expert_s: 0.1 }],
        };
        let act = vec![Active { expert: 0, tokens: 2, tier: DISK }, Active { expert: 5, tokens: 1, tier: DRAM }];
        let d = decide(&act, &c).unwrap();
        assert_eq!(d.choices, vec![Choice::Moved { link: 0 }, Choice::InPlace { lane: 0 }]);
        // The in-place expert runs while the disk reads: 0.1 s + the disk expert's compute.
        assert!((d.makespan_s - (0.1 + 1e-4 + 4e-3)).abs() < 1e-12, "{d:?}");
        let lost = vec![Active { expert: 7, tokens: 1, tier: 4 }];
        assert_eq!(decide(&lost, &c), Err(DecideError::Unreachable { expert: 7, tier: 4 }));
        let mut bad = c.clone();
        bad.lanes[0].per_token_s = f64::NAN;
        assert!(matches!(decide(&act, &bad), Err(DecideError::BadCost(s)) if s.contains("per_token_s")));
    }

    #[test]
    fn many_experts_take_the_greedy_path_and_stay_near_the_exact_answer() {
        // 60 experts (Qwen2-MoE) with 2 options each: 2^60 combinations, greedy. The answer must
        // be no worse than all-in-place and all-moved, and balance the two lanes.
        let c = gpu_cpu(1e-3, 5e-5, 4e-3);
        let act: Vec<Active> = (0..60).map(|e| Active { expert: e, tokens: 1 + e % 7, tier: DRAM }).collect();
        let d = decide(&act, &c).unwrap();
        let all_in = makespan(&act, &vec![Choice::InPlace { lane: 1 }; 60], &c).0;
        let all_moved = makespan(&act, &vec![Choice::Moved { link: 0 }; 60], &c).0;
        assert!(d.makespan_s <= all_in.min(all_moved), "{} vs {all_in} / {all_moved}", d.makespan_s);
        // No single change improves it (local optimum).
        for i in 0..act.len() {
            for o in [Choice::InPlace { lane: 1 }, Choice::Moved { link: 0 }] {
                let mut ch = d.choices.clone();
                ch[i] = o;
                assert!(makespan(&act, &ch, &c).0 >= d.makespan_s - 1e-12);
            }
        }
        // On 12 experts, where the exact answer is known, greedy comes within 10% of it.
        let act = &act[..12];
        let opts: Vec<Vec<Choice>> = act.iter().map(|a| options(a, &c)).collect();
        let exact = makespan(act, &exhaustive(act, &opts, &c, 1 << 12), &c).0;
        let quick = makespan(act, &greedy(act, &opts, &c), &c).0;
        assert!(quick <= exact * 1.1 + 1e-12, "greedy {quick} vs exact {exact}");
    }
}
