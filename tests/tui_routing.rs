//! The workbench's routing view: the decisions job measures the realised
//! compute exactly as `eval`'s routed evaluation does, its per-token
//! decisions equal an independent re-implementation of the routers, the
//! heat map draws those decisions cell by cell at 80×24 and 140×45, the
//! view says how to get a routed plan when none is open, and `o` opens a
//! routed plan (and refuses a section the workbench does not carry out).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

use scalpel::eval::perplexity::windows;
use scalpel::model::routing::{
    router_logits, save_to_plan, KvPolicy, RouteOn, Router, Routers, RoutingSection,
    ROUTERS_ARTIFACT,
};
use scalpel::model::{AttnExec, LayerPolicy, MlpExec, Model, Pass, RunOptions};
use scalpel::plan::{BlockId, ModelIdentity, Plan, PlanFile};
use scalpel::surgery::routing::measure::{evaluate_text, Routed};
use scalpel::surgery::routing::routed_blocks;
use scalpel::tui::app::{App, Request, View};
use scalpel::tui::jobs::routing::{
    decide, Cell, Decisions, RouteKey, RoutedTokens, Routes, RoutingJob, RoutingState, HOW_TO_ROUTE,
};
use scalpel::tui::jobs::Apply;
use scalpel::tui::ui::routing::{cell_column, geometry, RAN, SKIPPED, STATIC, UNROUTED};
use scalpel::tui::{handler, ui};

/// Routers with random weights around 0 (a mix of tokens runs each block)
/// on every block `plan` keeps, except `unrouted`.
fn random_routers(model: &Model, plan: &Plan, seed: u64, unrouted: BlockId) -> Routers {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = model.cfg().hidden_size;
    let mut r = Routers::default();
    for block in routed_blocks(model, plan, RouteOn::Both) {
        if block == unrouted {
            continue;
        }
        let v: Vec<f32> = (0..h).map(|_| rng.random_range(-0.3..=0.3)).collect();
        r.by_block.insert(
            block,
            Router {
                w: Tensor::new(v.as_slice(), &Device::Cpu).unwrap(),
                b: Tensor::new(&[0.05f32], &Device::Cpu).unwrap(),
                hidden: None,
            },
        );
    }
    r
}

/// The routers re-implemented from their definition (a token runs a block
/// when its router logit exceeds the threshold), recording every decision.
struct Reference<'a> {
    plan: &'a Plan,
    routers: &'a Routers,
    threshold: f32,
    ran: Mutex<BTreeMap<BlockId, Vec<bool>>>,
}

impl Reference<'_> {
    fn rows(&self, block: BlockId, x: &Tensor) -> Option<Vec<u32>> {
        let r = self.routers.by_block.get(&block)?;
        let logits: Vec<f32> = router_logits(x, r.weights())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let ran: Vec<bool> = logits.iter().map(|l| *l > self.threshold).collect();
        let rows = (0..ran.len() as u32).filter(|&i| ran[i as usize]).collect();
        self.ran.lock().unwrap().insert(block, ran);
        Some(rows)
    }
}

impl LayerPolicy for Reference<'_> {
    fn attn(&self, layer: usize, x: &Tensor) -> candle_core::Result<AttnExec> {
        let t = x.dim(1)?;
        if self.plan.skips_attn(layer) {
            return Ok(AttnExec::Skip);
        }
        Ok(match self.rows(BlockId::attn(layer), x) {
            None => AttnExec::Full,
            Some(rows) if rows.len() == t => AttnExec::Full,
            Some(rows) if rows.is_empty() => AttnExec::KvOnly,
            Some(rows) => AttnExec::Rows {
                rows,
                others_write_kv: true,
            },
        })
    }

    fn mlp(&self, layer: usize, x: &Tensor) -> candle_core::Result<MlpExec> {
        let t = x.dim(1)?;
        if self.plan.skips_mlp(layer) {
            return Ok(MlpExec::Skip);
        }
        Ok(match self.rows(BlockId::mlp(layer), x) {
            None => MlpExec::Full,
            Some(rows) if rows.len() == t => MlpExec::Full,
            Some(rows) if rows.is_empty() => MlpExec::Skip,
            Some(rows) => MlpExec::Rows(rows),
        })
    }
}

/// The expected cell of every (token, slot), from the reference.
fn reference_cells(model: &Model, ids: &[u32], routed: &Routed) -> Vec<Vec<Cell>> {
    let reference = Reference {
        plan: routed.plan,
        routers: routed.routers,
        threshold: routed.threshold,
        ran: Mutex::new(BTreeMap::new()),
    };
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut pass = Pass::plan(routed.plan, RunOptions::FAST).with_policy(&reference);
    model.transformer.forward_hidden(&input, &mut pass).unwrap();
    let ran = reference.ran.into_inner().unwrap();
    (0..ids.len())
        .map(|t| {
            (0..model.n_layers())
                .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
                .map(|b| match ran.get(&b) {
                    _ if routed.plan.is_skipped(b) => Cell::Static,
                    None => Cell::Unrouted,
                    Some(r) if r[t] => Cell::Ran,
                    Some(_) => Cell::Skipped,
                })
                .collect()
        })
        .collect()
}

struct Tiny {
    model: Model,
    plan: Plan,
    routers: Routers,
}

impl Tiny {
    /// The tiny llama with mlp.1 skipped by the plan, attn.0 without a
    /// router, and random routers elsewhere.
    fn new() -> Self {
        let model = common::load_tiny("llama");
        let plan = Plan::with_skips([BlockId::mlp(1)]);
        let routers = random_routers(&model, &plan, 7, BlockId::attn(0));
        Self {
            model,
            plan,
            routers,
        }
    }

    fn routed(&self) -> Routed<'_> {
        Routed {
            plan: &self.plan,
            routers: &self.routers,
            kv: KvPolicy::Write,
            threshold: 0.0,
        }
    }
}

/// Executed share over `eval`'s windows of `ids` (BOS first where the
/// model wants it), each window routed as the workbench routes its prompt:
/// one prefill through `decide`; each window's decisions also checked
/// against the reference.
fn executed_over_windows(model: &Model, ids: &[u32], window: usize, routed: &Routed) -> f64 {
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    let (mut executed, mut total) = (0usize, 0usize);
    for w in windows(ids, window, bos) {
        let d = decide(model, &w, routed).unwrap();
        assert_eq!(
            d.cells,
            reference_cells(model, &w, routed),
            "decisions differ from the routers' definition"
        );
        executed += d.cells.iter().flatten().filter(|c| c.executed()).count();
        total += d.cells.iter().flatten().count();
    }
    executed as f64 / total as f64
}

#[test]
fn the_decisions_job_measures_what_the_routed_eval_measures() {
    let tiny = Tiny::new();
    let model = &tiny.model;
    let routed = tiny.routed();
    let ids = common::random_set(model, 11, 1, 40).sequences[0]
        .ids
        .clone();
    // `eval`'s windows (BOS first where the model wants it), each routed as
    // the workbench routes its prompt: one prefill.
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    let window = 24;
    let (mut executed, mut total) = (0usize, 0usize);
    let mut seen = [0usize; 4];
    for w in windows(&ids, window, bos) {
        let d = decide(model, &w, &routed).unwrap();
        let want = reference_cells(model, &w, &routed);
        assert_eq!(
            d.cells, want,
            "decisions differ from the routers' definition"
        );
        for row in &d.cells {
            for c in row {
                executed += usize::from(c.executed());
                total += 1;
                seen[*c as usize] += 1;
            }
        }
        // Measured by the policy, counted from the cells: the same number.
        let from_cells = d.cells.iter().flatten().filter(|c| c.executed()).count() as f64
            / d.cells.iter().flatten().count() as f64;
        assert_eq!(d.executed_fraction, from_cells);
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "every kind of cell occurs (ran, skipped, static, unrouted): {seen:?}"
    );
    let eval = evaluate_text(model, &ids, window, &routed, RunOptions::FAST, false).unwrap();
    let ours = executed as f64 / total as f64;
    assert_eq!(ours, eval.executed_fraction, "as eval --json reports it");
    assert!(ours > 0.3 && ours < 0.9, "a mix of tokens ran: {ours}");
}

fn section() -> RoutingSection {
    RoutingSection {
        artifact: ROUTERS_ARTIFACT.into(),
        on: RouteOn::Both,
        capacity: 0.8,
        kv: KvPolicy::Write,
        threshold: 0.0,
    }
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal.draw(|f| ui::draw(f, app)).unwrap();
    terminal.backend().to_string()
}

/// The screen's rows, without the quotes TestBackend prints around them.
fn rows(screen: &str) -> Vec<Vec<char>> {
    screen
        .lines()
        .map(|l| {
            let c: Vec<char> = l.chars().collect();
            c[1..c.len() - 1].to_vec()
        })
        .collect()
}

fn app_with(identity: ModelIdentity, n_layers: usize, tokens: RoutedTokens, plan: Plan) -> App {
    let mut app = App::new(
        common::workbench_info(identity, n_layers),
        Plan::base(),
        tokens.key.prompt.clone(),
        Instant::now(),
    );
    let mut r = RoutingState::new(tokens.key.path.clone(), section(), plan);
    r.tokens = Some(tokens);
    app.routing = Some(r);
    app.view = View::Routing;
    app
}

/// Finds the screen row of token `token` (its label starts with its number).
fn token_row(screen: &[Vec<char>], inner_x: usize, token: usize) -> Option<usize> {
    let label = format!("{:>3} ", token + 1);
    screen.iter().position(|r| {
        r.len() > inner_x + 4 && r[inner_x..inner_x + 4].iter().collect::<String>() == label
    })
}

fn expected_glyph(c: Cell) -> char {
    match c {
        Cell::Ran => RAN,
        Cell::Skipped => SKIPPED,
        Cell::Static => STATIC,
        Cell::Unrouted => UNROUTED,
    }
}

/// Every shown cell of the heat map is the reference decision's glyph.
fn check_cells(screen: &str, width: u16, n_layers: usize, want: &[Vec<Cell>]) -> usize {
    let grid = rows(screen);
    // The view's panel starts at column 0 (border), so its inner text at 1
    // (and the rows function drops one quote: columns shift by 0).
    let g = geometry(width as usize - 2, n_layers);
    let mut checked = 0;
    for (token, cells) in want.iter().enumerate() {
        let Some(y) = token_row(&grid, 1, token) else {
            continue;
        };
        for l in 0..n_layers {
            for b in [BlockId::attn(l), BlockId::mlp(l)] {
                let x = 1 + cell_column(g, b);
                let s = 2 * l + usize::from(b.kind == scalpel::plan::BlockKind::Mlp);
                assert_eq!(
                    grid[y][x],
                    expected_glyph(cells[s]),
                    "token {token} {b}: {screen}"
                );
                checked += 1;
            }
        }
    }
    checked
}

/// The tiny model's decisions, drawn: each cell is what the routers
/// (re-implemented) decided, at both sizes.
#[test]
fn the_heat_map_draws_each_tokens_decision_at_80x24_and_140x45() {
    let tiny = Tiny::new();
    let model = &tiny.model;
    let routed = tiny.routed();
    let ids = common::random_set(model, 3, 1, 30).sequences[0].ids.clone();
    let decisions = decide(model, &ids, &routed).unwrap();
    let want = reference_cells(model, &ids, &routed);
    let tokens = RoutedTokens {
        key: RouteKey {
            path: "routed.json".into(),
            prompt: "random ids".into(),
            continuation: String::new(),
        },
        pieces: ids.iter().map(|i| format!("id{i}")).collect(),
        prompt_tokens: ids.len(),
        decisions: decisions.clone(),
    };
    let mut app = app_with(model.identity.clone(), 4, tokens, tiny.plan.clone());
    for (w, h) in [(80, 24), (140, 45)] {
        let screen = render(&app, w, h);
        let checked = check_cells(&screen, w, 4, &want);
        assert!(checked >= 8 * 10, "{checked} cells checked at {w}×{h}");
        let pct = format!(
            "executed {:.1}% of blocks",
            decisions.executed_fraction * 100.0
        );
        assert!(screen.contains(&pct), "{screen}");
    }
    // Scrolling shows later tokens, still each as decided.
    app.routing.as_mut().unwrap().scroll = 20;
    let screen = render(&app, 80, 24);
    assert!(token_row(&rows(&screen), 1, 29).is_some(), "{screen}");
    assert!(check_cells(&screen, 80, 4, &want) >= 8 * 9);
}

/// A 30-layer routed plan (SmolLM2's shape) with a hand-made pattern:
/// every layer's two blocks fit 80 columns, with gaps at 140.
fn thirty_layer_tokens() -> (RoutedTokens, Vec<Vec<Cell>>) {
    let pieces: Vec<String> = [
        "<|im_start|>",
        "user",
        "\n",
        "Explain",
        " in",
        " two",
        " sentences",
        " why",
        " the",
        " sky",
        " is",
        " blue",
        ".",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant",
        "\n",
        "The",
        " sky",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cells: Vec<Vec<Cell>> = (0..pieces.len())
        .map(|t| {
            (0..60)
                .map(|s| match s {
                    // mlp.27 skipped by the plan; attn.0 without a router.
                    55 => Cell::Static,
                    0 => Cell::Unrouted,
                    _ if (t * 7 + s * 3) % 10 < 2 => Cell::Skipped,
                    _ => Cell::Ran,
                })
                .collect()
        })
        .collect();
    let executed = cells.iter().flatten().filter(|c| c.executed()).count() as f64
        / cells.iter().flatten().count() as f64;
    let tokens = RoutedTokens {
        key: RouteKey {
            path: "routed.json".into(),
            prompt: "Explain in two sentences why the sky is blue.".into(),
            continuation: "The sky".into(),
        },
        pieces,
        prompt_tokens: 18,
        decisions: Decisions {
            cells: cells.clone(),
            executed_fraction: executed,
            routed_share: 0.815,
        },
    };
    (tokens, cells)
}

#[test]
fn a_thirty_layer_heat_map_fits_80x24_and_140x45() {
    let (tokens, cells) = thirty_layer_tokens();
    let app = app_with(
        common::smollm2_identity(),
        30,
        tokens,
        Plan::with_skips([BlockId::mlp(27)]),
    );
    let small = render(&app, 80, 24);
    assert!(check_cells(&small, 80, 30, &cells) >= 60 * 9, "{small}");
    assert!(small.contains(" 10 ␣sky"), "{small}");
    assert!(small.contains("routing view"), "{small}");
    insta::assert_snapshot!("routing_view_80x24", small);
    let large = render(&app, 140, 45);
    assert!(check_cells(&large, 140, 30, &cells) >= 60 * 20, "{large}");
    assert!(large.contains("over mlp.27"), "{large}");
    insta::assert_snapshot!("routing_view_140x45", large);
}

#[test]
fn without_a_routed_plan_the_view_says_how_to_get_one() {
    let mut app = App::new(
        common::workbench_info(common::smollm2_identity(), 30),
        Plan::base(),
        "Hello".into(),
        Instant::now(),
    );
    let reqs = handler::handle_key(&mut app, key(KeyCode::Char('v')));
    assert!(reqs.is_empty());
    let reqs = handler::handle_key(&mut app, key(KeyCode::Char('v')));
    assert_eq!(app.view, View::Routing);
    assert!(reqs.is_empty(), "nothing to route: {reqs:?}");
    for (w, h, name) in [
        (80, 24, "no_routed_plan_80x24"),
        (140, 45, "no_routed_plan_140x45"),
    ] {
        let screen = render(&app, w, h);
        assert!(screen.contains(HOW_TO_ROUTE), "{screen}");
        assert!(screen.contains("then o opens routed.json"), "{screen}");
        insta::assert_snapshot!(name, screen);
    }
    handler::handle_key(&mut app, key(KeyCode::Char('r')));
    let status = app.status.clone().unwrap();
    assert!(
        status.error && status.text.contains(HOW_TO_ROUTE),
        "{status:?}"
    );
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn open(app: &mut App, path: &Path) -> Vec<Request> {
    handler::handle_key(app, key(KeyCode::Char('o')));
    handler::handle_key(
        app,
        KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL),
    );
    for c in path.display().to_string().chars() {
        handler::handle_key(app, key(KeyCode::Char(c)));
    }
    handler::handle_key(app, key(KeyCode::Enter))
}

/// `o` opens a routed plan: its static plan becomes the current plan, its
/// routing the routing view's, and the prompt is routed by a job on the
/// job interface (the decisions land through its `Apply`). A KV plan
/// opens into the KV view; a healed plan is refused with what to do, not
/// opened as its skips alone.
#[test]
fn opening_a_routed_plan_routes_the_prompt_in_the_background() {
    let tiny = Tiny::new();
    let model = &tiny.model;
    let dir = common::scratch_dir();
    let path = dir.path().join("routed.json");
    let mut file = PlanFile::new(model.identity.clone(), tiny.plan.clone());
    save_to_plan(&mut file, &path, &tiny.routers, &section()).unwrap();
    file.save(&path).unwrap();

    let mut app = App::new(
        common::workbench_info(model.identity.clone(), 4),
        Plan::base(),
        "Hello".into(),
        Instant::now(),
    );
    let reqs = open(&mut app, &path);
    let status = app.status.clone().unwrap();
    assert!(!status.error, "{status:?}");
    assert!(status.text.contains("routing view (v)"), "{}", status.text);
    assert_eq!(app.plan(), &tiny.plan);
    let r = app.routing.as_ref().unwrap();
    assert_eq!(
        (r.section.clone(), r.plan.clone()),
        (section(), tiny.plan.clone())
    );
    let key = RouteKey {
        path: path.clone(),
        prompt: "Hello".into(),
        continuation: String::new(),
    };
    let job = Request::run(RoutingJob { key: key.clone() });
    assert!(reqs.contains(&job), "{reqs:?}");
    assert_eq!(job.job_name().as_deref(), Some("routing decisions"));
    // Already asked for: switching to the view asks nothing more.
    app.view = View::Blocks;
    handler::handle_key(&mut app, key_v());
    handler::handle_key(&mut app, key_v());
    assert_eq!(app.view, View::Routing);
    assert!(app.refresh_routing(false).is_empty());
    let screen = render(&app, 80, 24);
    assert!(screen.contains("routing the prompt"), "{screen}");

    // The job's result, applied: the heat map shows it. (The tiny model
    // has no tokenizer; its ids stand in for the prompt.)
    let ids = common::random_set(model, 5, 1, 12).sequences[0].ids.clone();
    let decisions = decide(model, &ids, &tiny.routed()).unwrap();
    let tokens = RoutedTokens {
        key: key.clone(),
        pieces: ids.iter().map(|i| format!("id{i}")).collect(),
        prompt_tokens: ids.len(),
        decisions,
    };
    // A stale answer (another prompt) is dropped.
    let stale = RouteKey {
        prompt: "Bye".into(),
        ..key.clone()
    };
    Box::new(Routes {
        key: stale,
        result: Ok(tokens.clone()),
    })
    .apply(&mut app);
    assert!(app.routing.as_ref().unwrap().tokens.is_none());
    Box::new(Routes {
        key,
        result: Ok(tokens),
    })
    .apply(&mut app);
    let screen = render(&app, 80, 24);
    assert!(screen.contains("routed.json · 12 tokens"), "{screen}");

    // A KV-budget plan opens: its policy becomes the KV view's, attached.
    let kv = dir.path().join("kv.json");
    let mut file = PlanFile::new(model.identity.clone(), Plan::base());
    file.sections
        .set("kv", &serde_json::json!({"policy": "quest:512:8:1"}))
        .unwrap();
    file.save(&kv).unwrap();
    open(&mut app, &kv);
    let status = app.status.clone().unwrap();
    assert!(!status.error, "{status:?}");
    assert!(status.text.contains("KV view (v)"), "{}", status.text);
    // Kept as written (not the view's defaults), so saving loses nothing.
    assert_eq!(app.kv.spec().to_string(), "quest:512:8:1");
    assert!(app.kv.attached);
    let saved = scalpel::tui::plan_io::plan_file(&app);
    let section: scalpel::plan::KvSection = saved.sections.get("kv").unwrap().unwrap();
    assert_eq!(section.policy, "quest:512:8:1");

    // A healed plan: refused, the message says what to do.
    let healed = dir.path().join("healed.json");
    let mut file = PlanFile::new(model.identity.clone(), Plan::base());
    let heal = serde_json::json!({"rank": 4, "targets": [], "layers": [], "artifact": "x", "parameters": 0});
    file.sections.set("heal", &heal).unwrap();
    file.save(&healed).unwrap();
    let before = app.plan().clone();
    open(&mut app, &healed);
    let status = app.status.clone().unwrap();
    assert!(status.error, "{status:?}");
    assert!(
        status.text.contains("`heal` section") && status.text.contains("the workbench"),
        "{}",
        status.text
    );
    assert_eq!(app.plan(), &before);
}

fn key_v() -> KeyEvent {
    key(KeyCode::Char('v'))
}

/// The job on the real model: the prompt through the chat template as text
/// pieces, and the executed fraction the routers realised, as the routed
/// eval measures it on the same tokens.
#[test]
fn the_routing_job_routes_the_prompt_on_smollm2() {
    let model = common::smollm2();
    let plan = Plan::base();
    let routers = random_routers(model, &plan, 9, BlockId::attn(0));
    let dir = common::scratch_dir();
    let path = dir.path().join("routed.json");
    let mut file = PlanFile::new(model.identity.clone(), plan.clone());
    save_to_plan(&mut file, &path, &routers, &section()).unwrap();
    file.save(&path).unwrap();
    let key = RouteKey {
        path,
        prompt: "Why is the sky blue?".into(),
        continuation: " Because of Rayleigh scattering.".into(),
    };
    let tokens = RoutingJob { key: key.clone() }.routes(model).unwrap();
    let ids = model.prompt_ids_preferring_chat(&key.prompt).unwrap();
    assert_eq!(tokens.prompt_tokens, ids.len());
    assert!(
        tokens.pieces.len() > ids.len(),
        "the continuation is routed too"
    );
    assert!(
        tokens.pieces.iter().any(|p| p == " sky"),
        "{:?}",
        tokens.pieces
    );
    assert!(
        tokens.pieces.iter().any(|p| p == "<|im_start|>"),
        "{:?}",
        tokens.pieces
    );
    let mut all = ids.clone();
    all.extend(model.codec().unwrap().encode(&key.continuation).unwrap());
    let routed = Routed {
        plan: &plan,
        routers: &routers,
        kv: KvPolicy::Write,
        threshold: 0.0,
    };
    let eval = evaluate_text(model, &all, 24, &routed, RunOptions::FAST, false).unwrap();
    assert_eq!(
        executed_over_windows(model, &all, 24, &routed),
        eval.executed_fraction,
        "as eval --json reports it"
    );
    let d = decide(model, &all, &routed).unwrap();
    assert_eq!(d, tokens.decisions);
    let f = d.executed_fraction;
    assert!(f > 0.2 && f < 0.95, "random routers run a mix: {f}");
}
