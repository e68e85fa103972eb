//! A graph over several processes: the second half of the layers in a `weir worker` process of
//! its own, activations crossing over remote edges (Unix sockets) and back.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weir::{Engine, EngineOptions, Event, Model, Request};

/// A `weir worker` process, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(model: &Path, graph: &Path, process: &str) -> Worker {
    let log = std::fs::File::create(graph.with_extension(format!("{process}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["worker", "--model"])
        .arg(model)
        .arg("--graph")
        .arg(graph)
        .args(["--process", process, "--threads", "1"])
        .env("WEIR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start weir worker");
    Worker(child)
}

/// The architecture's built-in graph with layers 1.. on lane `back` of process `tail`, and
/// both processes listening on Unix sockets in `dir`.
fn two_process_graph(model: &Model, dir: &Path) -> PathBuf {
    let (_, text) = weir_graphs::builtin::for_architecture(model.config.architecture);
    let extra = format!(
        "\nprocess main at=\"unix:{d}/main.sock\"\nprocess tail at=\"unix:{d}/tail.sock\"\n\
         lane back cpu threads=1 process=tail\nplace layers=1..layers lane=back\n",
        d = dir.display()
    );
    let path = dir.join("two.weir");
    std::fs::write(&path, format!("{text}{extra}")).unwrap();
    path
}

fn main_opts(graph: &Path) -> EngineOptions {
    let text = std::fs::read_to_string(graph).unwrap();
    EngineOptions {
        graph: Some((text, graph.display().to_string())),
        threads: 1,
        max_pass_tokens: 8,
        ..Default::default()
    }
}

#[test]
fn two_processes_give_the_golden_tokens_for_dense_and_moe_models() {
    for name in ["tiny-llama", "tiny-mixtral"] {
        let model = Model::open(fixture(name)).unwrap();
        let dir = tmpdir(&format!("pipeline-{name}"));
        let graph = two_process_graph(&model, &dir);
        let _w = worker(&fixture(name), &graph, "tail");
        // Two micro-batches: both processes compute at once.
        let engine = Engine::new(&model, EngineOptions { micro_batches: 2, ..main_opts(&graph) }).unwrap();
        let net = |k: &str| k.starts_with("net_");
        let here = engine.graph().nodes.iter().filter(|n| !net(n.op.kind()));
        assert!(here.clone().all(|n| n.layer.is_none_or(|l| l == 0)), "{name}: layer 1 left main");
        assert_eq!(engine.graph().nodes.iter().filter(|n| net(n.op.kind())).count(), 2, "{name}: out and back");
        let golden = golden(name);
        let mut gens = Vec::new();
        for p in golden["prompts"].as_array().unwrap() {
            let want = ids(&p["greedy"]["new_ids"]);
            gens.push((engine.submit(Request::greedy(ids(&p["input_ids"]), want.len())).unwrap(), want));
        }
        for (gen, want) in gens {
            assert_eq!(gen.wait().unwrap().tokens, want, "{name}: through two processes, transformers' tokens");
        }
    }
}

#[test]
fn the_example_file_runs_across_two_processes() {
    let dir = tmpdir("pipeline-example");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/graphs/two-processes.weir"))
        .unwrap()
        .replace("127.0.0.1:7300", &format!("unix:{}/m.sock", dir.display()))
        .replace("127.0.0.1:7301", &format!("unix:{}/t.sock", dir.display()))
        // This machine may have one CPU: both processes' lanes on core 0.
        .replace("cores=1", "cores=0");
    let graph = dir.join("two-processes.weir");
    std::fs::write(&graph, text).unwrap();
    let _w = worker(&fixture("tiny-llama"), &graph, "tail");
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let engine = Engine::new(&model, main_opts(&graph)).unwrap();
    let p = &golden("tiny-llama")["prompts"][0];
    let want = ids(&p["greedy"]["new_ids"]);
    assert_eq!(engine.generate(Request::greedy(ids(&p["input_ids"]), want.len())).unwrap().tokens, want);
}

#[test]
fn a_worker_killed_fails_its_requests_and_a_new_one_serves_again() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let dir = tmpdir("pipeline-kill");
    let graph = two_process_graph(&model, &dir);
    let mut w = worker(&fixture("tiny-llama"), &graph, "tail");
    let engine = Engine::new(&model, main_opts(&graph)).unwrap();
    let p = &golden("tiny-llama")["prompts"][0];
    let (prompt, want) = (ids(&p["input_ids"]), ids(&p["greedy"]["new_ids"]));
    assert_eq!(engine.generate(Request::greedy(prompt.clone(), want.len())).unwrap().tokens, want);

    // Killed mid-generation: the request ends with an error naming the edge, in bounded time.
    let mut gen = engine.submit(Request::greedy(prompt.clone(), 240 - prompt.len())).unwrap();
    assert!(matches!(gen.next_event(), Some(Event::Token { .. })));
    w.0.kill().unwrap();
    let t = Instant::now();
    let err = gen.wait().expect_err("the worker died: the request cannot finish");
    assert!(t.elapsed() < Duration::from_secs(10));
    let msg = err.to_string();
    assert!(msg.contains("process `tail`") && msg.contains("edge"), "{msg}");
    drop(w);

    // A new worker: the next request starts the program afresh, connects again, and is right.
    let _w = worker(&fixture("tiny-llama"), &graph, "tail");
    assert_eq!(engine.generate(Request::greedy(prompt.clone(), want.len())).unwrap().tokens, want);
    // And main restarting (a new engine) finds the same worker waiting for its next run.
    drop(engine);
    let engine = Engine::new(&model, main_opts(&graph)).unwrap();
    assert_eq!(engine.generate(Request::greedy(prompt, want.len())).unwrap().tokens, want);
}

#[test]
fn without_its_worker_main_says_which_process_is_missing() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let dir = tmpdir("pipeline-missing");
    let graph = two_process_graph(&model, &dir);
    let opts = EngineOptions { connect_timeout: Duration::from_millis(500), ..main_opts(&graph) };
    let msg = Engine::new(&model, opts).err().expect("nobody runs process tail").to_string();
    assert!(msg.contains("process `tail`") && msg.contains("weir worker --process tail"), "{msg}");
}

#[test]
fn a_worker_of_another_model_is_refused_by_its_fingerprint() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let dir = tmpdir("pipeline-other-model");
    let graph = two_process_graph(&model, &dir);
    // The MoE fixture placed by the dense model's file: same layer names, another model.
    let other = two_process_graph(&Model::open(fixture("tiny-mixtral")).unwrap(), &tmpdir("pipeline-other-moe"));
    let text = std::fs::read_to_string(&other)
        .unwrap()
        .replace(&format!("{}", other.parent().unwrap().display()), &format!("{}", dir.display()));
    let moe_graph = dir.join("moe.weir");
    std::fs::write(&moe_graph, text).unwrap();
    let _w = worker(&fixture("tiny-mixtral"), &moe_graph, "tail");
    let opts = EngineOptions { connect_timeout: Duration::from_secs(5), ..main_opts(&graph) };
    let msg = Engine::new(&model, opts).err().expect("the worker runs another model").to_string();
    assert!(msg.contains("fingerprint"), "{msg}");
}

#[test]
fn bad_process_declarations_are_refused_by_name() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (_, text) = weir_graphs::builtin::for_architecture(model.config.architecture);
    let place = |extra: &str, process: Option<&str>| {
        let opts = EngineOptions {
            graph: Some((format!("{text}{extra}"), "g.weir".into())),
            process: process.map(str::to_string),
            ..Default::default()
        };
        model
            .place(opts.graph.as_ref().map(|(t, n)| (t.as_str(), n.as_str())), &opts.placement(256))
            .err()
            .map(|e| e.to_string())
    };
    // `weir graph check` checks every process's part, and a worker's part alone.
    let dir = tmpdir("pipeline-check");
    let g = two_process_graph(&model, &dir);
    let report = weir::check_graph(&std::fs::read_to_string(&g).unwrap(), "two.weir", Some(&model), 1).unwrap();
    assert!(report.contains("main: 3 lanes") && report.contains("tail: 3 lanes, 14 operators"), "{report}");

    let e = place("lane back cpu threads=1 process=nowhere\n", None).unwrap();
    assert!(e.contains("unknown process `nowhere`") && e.contains("g.weir:"), "{e}");
    let e = place("process tail\nprocess tail\n", None).unwrap();
    assert!(e.contains("process `tail` is declared twice"), "{e}");
    let e = place("process tail at=3\n", None).unwrap();
    assert!(e.contains("`at` must be an address"), "{e}");
    let e = place(
        "process tail at=\"unix:/x\"\nlane back cpu threads=1 process=tail\nplace kind=sampler lane=back\n",
        None,
    )
    .unwrap();
    assert!(e.contains("output `sampler`") && e.contains("must run in `main`"), "{e}");
    let e = place("process tail at=\"unix:/x\"\n", Some("elsewhere")).unwrap();
    assert!(e.contains("--process elsewhere") && e.contains("declared: main, tail"), "{e}");

    // An address main cannot listen at is named with its process.
    let dir = tmpdir("pipeline-bad-at");
    let g = two_process_graph(&model, &dir);
    let bad_at = std::fs::read_to_string(&g)
        .unwrap()
        .replace(&format!("unix:{}/main.sock", dir.display()), "unix:/no/such/dir/m.sock");
    let opts = EngineOptions { graph: Some((bad_at, "g.weir".into())), threads: 1, ..Default::default() };
    let e = Engine::new(&model, opts).err().expect("the address cannot be bound").to_string();
    assert!(e.contains("process `main`") && e.contains("/no/such/dir/m.sock"), "{e}");

    // The CLI: a worker needs --process and --graph, and a process that runs something.
    let weir = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_weir")).args(args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let m = fixture("tiny-llama");
    let m = m.to_str().unwrap();
    assert!(weir(&["worker", "--model", m]).contains("--process"));
    assert!(weir(&["worker", "--model", m, "--process", "tail"]).contains("--graph"));
    let dir = tmpdir("pipeline-bad-cli");
    let g = two_process_graph(&model, &dir);
    let idle = dir.join("idle.weir");
    std::fs::write(&idle, format!("{text}process idle at=\"unix:{}/idle.sock\"\n", dir.display())).unwrap();
    let e = weir(&["worker", "--model", m, "--graph", idle.to_str().unwrap(), "--process", "idle"]);
    assert!(e.contains("--process idle") && e.contains("no operator"), "{e}");
    let e = weir(&["worker", "--model", m, "--graph", g.to_str().unwrap(), "--process", "main"]);
    assert!(e.contains("--process main"), "{e}");
    let e = weir(&["run", "--model", m, "--graph", g.to_str().unwrap(), "--process", "tail", "--prompt", "hi"]);
    assert!(e.contains("weir worker"), "{e}");
}
