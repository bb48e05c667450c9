//! Keys and mouse clicks → changes to the `App` and requests for the worker.

use std::path::PathBuf;

use ratatui::crossterm::event::{
    KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::layout::Rect;

use super::app::{App, ChartY, InputKind, Mode, Request, View};
use super::jobs::routing::SCROLL_STEP;
use super::keys::{self, Action, HistoryAction, InputAction};
use super::plan_io;
use super::ui;

pub fn handle_key(app: &mut App, key: KeyEvent) -> Vec<Request> {
    if key.kind != KeyEventKind::Press {
        return vec![];
    }
    if keys::FORCE_QUIT.matches(&key) {
        app.quit = true;
        return vec![];
    }
    match app.mode.clone() {
        Mode::Help => {
            app.mode = Mode::Normal;
            vec![]
        }
        Mode::History { selected } => history_key(app, key, selected),
        Mode::Input { kind, text } => input_key(app, key, kind, text),
        Mode::Normal => normal_key(app, key),
    }
}

fn normal_key(app: &mut App, key: KeyEvent) -> Vec<Request> {
    let Some((command, action)) = keys::find(keys::main_commands(), &key) else {
        return vec![];
    };
    if !command.when.holds(app) {
        let (why, error) = command.when.refusal();
        app.set_status(why, error);
        return vec![];
    }
    run(app, action)
}

/// Carries out one main-screen action (every `keys::Action` has its arm).
pub fn run(app: &mut App, action: Action) -> Vec<Request> {
    let n = app.info.n_layers as isize;
    match action {
        Action::Quit => app.quit = true,
        Action::Help => app.mode = Mode::Help,
        Action::Left => app.move_cursor(-1, 0),
        Action::Right => app.move_cursor(1, 0),
        Action::Up => app.move_cursor(0, -1),
        Action::Down => app.move_cursor(0, 1),
        Action::FirstLayer => app.move_cursor(-n, 0),
        Action::LastLayer => app.move_cursor(n, 0),
        Action::Toggle => return app.toggle_cursor(),
        Action::Clear => return app.clear_skips(),
        Action::Metric => app.metric = app.metric.next(),
        Action::Redo => return app.redo(),
        Action::Undo => return app.undo(),
        Action::History => app.mode = Mode::History { selected: app.at },
        Action::Search => open_input(app, InputKind::SearchK, "4".into()),
        Action::Fit => return app.start_fit(),
        Action::CancelJob => return app.cancel_job(),
        Action::ChartX => app.chart_x = app.next_chart_x(),
        Action::ChartY => {
            app.chart_y = match app.chart_y {
                ChartY::Kl => ChartY::Perplexity,
                ChartY::Perplexity => ChartY::Kl,
            }
        }
        Action::Generate => return app.generate(false),
        Action::Draft => return app.generate(true),
        Action::View => {
            app.view = app.view.next();
            match app.view {
                View::Routing => return app.refresh_routing(false),
                View::Kv => return app.refresh_kv_map(),
                _ => {}
            }
        }
        Action::KvPolicy => return app.next_kv_policy(),
        Action::KvBudgetUp => return app.scale_kv_budget(true),
        Action::KvBudgetDown => return app.scale_kv_budget(false),
        Action::KvAttach => app.toggle_kv_attached(),
        Action::KvLong => return app.measure_kv_long(),
        Action::EarlierTokens => app.scroll_routing(-(SCROLL_STEP as isize)),
        Action::LaterTokens => app.scroll_routing(SCROLL_STEP as isize),
        Action::RouteAgain => return app.refresh_routing(true),
        Action::EditPrompt => {
            let prompt = app.gen.prompt.clone();
            open_input(app, InputKind::Prompt, prompt);
        }
        Action::Save => {
            let path = app.save_path.display().to_string();
            open_input(app, InputKind::SavePath, path);
        }
        Action::Open => {
            let path = app.save_path.display().to_string();
            open_input(app, InputKind::OpenPath, path);
        }
    }
    vec![]
}

fn open_input(app: &mut App, kind: InputKind, text: String) {
    app.mode = Mode::Input { kind, text };
}

fn history_key(app: &mut App, key: KeyEvent, selected: usize) -> Vec<Request> {
    let last = app.history.len() - 1;
    match keys::find(keys::HISTORY, &key).map(|(_, a)| a) {
        Some(HistoryAction::Previous) => {
            app.mode = Mode::History {
                selected: selected.saturating_sub(1),
            }
        }
        Some(HistoryAction::Next) => {
            app.mode = Mode::History {
                selected: (selected + 1).min(last),
            }
        }
        Some(HistoryAction::Jump) => {
            app.mode = Mode::Normal;
            return app.jump(selected);
        }
        Some(HistoryAction::Close) => app.mode = Mode::Normal,
        None => {}
    }
    vec![]
}

fn input_key(app: &mut App, key: KeyEvent, kind: InputKind, mut text: String) -> Vec<Request> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    match keys::find(keys::INPUT, &key).map(|(_, a)| a) {
        Some(InputAction::Cancel) => {
            app.mode = Mode::Normal;
            return vec![];
        }
        Some(InputAction::Submit) => {
            app.mode = Mode::Normal;
            return submit(app, kind, text);
        }
        Some(InputAction::DeleteChar) => {
            text.pop();
        }
        Some(InputAction::ClearText) => text.clear(),
        // Any other printable key types itself.
        None => {
            if let KeyCode::Char(c) = key.code {
                if !ctrl {
                    text.push(c);
                }
            }
        }
    }
    app.mode = Mode::Input { kind, text };
    vec![]
}

fn submit(app: &mut App, kind: InputKind, text: String) -> Vec<Request> {
    let text = text.trim().to_string();
    match kind {
        InputKind::Prompt => {
            app.gen.prompt = text;
            app.dirty = true;
            app.generate(app.gen.drafting)
        }
        InputKind::SearchK => match text.parse::<usize>() {
            Ok(k) => app.start_search(k),
            Err(_) => {
                app.set_status(format!("`{text}` is not a number of blocks"), true);
                vec![]
            }
        },
        InputKind::SavePath | InputKind::OpenPath if text.is_empty() => {
            app.set_status("no file name given", true);
            vec![]
        }
        InputKind::SavePath => {
            let path = PathBuf::from(&text);
            match plan_io::save(app, &path) {
                Ok(()) => {
                    app.set_status(format!("saved {}", path.display()), false);
                    app.save_path = path;
                }
                Err(e) => app.set_status(format!("{e:#}"), true),
            }
            vec![]
        }
        InputKind::OpenPath => {
            let path = PathBuf::from(&text);
            match plan_io::open(app, &path) {
                Ok(opened) => {
                    if app.search_running() {
                        app.set_status("a search is changing the plan; Esc cancels it first", true);
                        return vec![];
                    }
                    app.save_path = path.clone();
                    let mut reqs = app.push_plan(opened.plan.clone());
                    let mut notes: String = opened.notes.iter().map(|n| format!("; {n}")).collect();
                    if let Some(section) = opened.routing {
                        reqs.extend(app.open_routing(&path, section, opened.plan));
                        notes.push_str(plan_io::ROUTED_NOTE);
                    }
                    if let Some(kv) = &opened.kv {
                        match app.kv.adopt(kv) {
                            Ok(()) => notes.push_str(plan_io::KV_NOTE),
                            Err(e) => notes.push_str(&format!("; {e:#}")),
                        }
                    }
                    app.set_status(format!("opened {}{notes}", path.display()), false);
                    reqs
                }
                Err(e) => {
                    app.set_status(format!("{e:#}"), true);
                    vec![]
                }
            }
        }
    }
}

/// A left click on a grid cell moves the cursor there; a right click also toggles it.
pub fn handle_mouse(app: &mut App, mouse: MouseEvent, screen: Rect) -> Vec<Request> {
    if app.mode != Mode::Normal || app.view != View::Blocks || ui::too_small(screen) {
        return vec![];
    }
    let grid = ui::areas(screen, app).grid;
    let hit = ui::grid::cell_at(grid, app.info.n_layers, mouse.column, mouse.row);
    match (mouse.kind, hit) {
        (MouseEventKind::Down(MouseButton::Left), Some(block)) => {
            if app.cursor == block {
                return app.toggle_cursor();
            }
            app.cursor = block;
        }
        (MouseEventKind::Down(MouseButton::Right), Some(block)) => {
            app.cursor = block;
            return app.toggle_cursor();
        }
        _ => {}
    }
    vec![]
}
