//! Keys and mouse clicks → changes to the `App` and requests for the worker.

use std::path::PathBuf;

use ratatui::crossterm::event::{
    KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::layout::Rect;

use super::app::{App, ChartX, ChartY, InputKind, Mode, Request};
use super::plan_io;
use super::ui;

pub fn handle_key(app: &mut App, key: KeyEvent) -> Vec<Request> {
    if key.kind != KeyEventKind::Press {
        return vec![];
    }
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl && key.code == KeyCode::Char('c') {
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
        Mode::Normal => normal_key(app, key, ctrl),
    }
}

fn normal_key(app: &mut App, key: KeyEvent, ctrl: bool) -> Vec<Request> {
    let n = app.info.n_layers as isize;
    match key.code {
        KeyCode::Char('q') => app.quit = true,
        KeyCode::Char('?') => app.mode = Mode::Help,
        KeyCode::Left | KeyCode::Char('h') => app.move_cursor(-1, 0),
        KeyCode::Right | KeyCode::Char('l') => app.move_cursor(1, 0),
        KeyCode::Up | KeyCode::Char('k') => app.move_cursor(0, -1),
        KeyCode::Down | KeyCode::Char('j') => app.move_cursor(0, 1),
        KeyCode::Home | KeyCode::Char('0') => app.move_cursor(-n, 0),
        KeyCode::End | KeyCode::Char('$') => app.move_cursor(n, 0),
        KeyCode::Char(' ') | KeyCode::Enter => return app.toggle_cursor(),
        KeyCode::Char('c') => return app.clear_skips(),
        KeyCode::Char('m') => app.metric = app.metric.next(),
        KeyCode::Char('r') if ctrl => return app.redo(),
        KeyCode::Char('U') => return app.redo(),
        KeyCode::Char('u') => return app.undo(),
        KeyCode::Char('H') => app.mode = Mode::History { selected: app.at },
        KeyCode::Char('S') => {
            if app.job.is_some() {
                app.set_status("a background job is running; Esc cancels it", true);
            } else {
                open_input(app, InputKind::SearchK, "4".into());
            }
        }
        KeyCode::Char('F') => return app.start_fit(),
        KeyCode::Esc => {
            if app.job.is_none() {
                app.set_status("no background job to cancel", false);
            }
            return app.cancel_job();
        }
        KeyCode::Char('x') => {
            app.chart_x = match app.chart_x {
                ChartX::BlocksSkipped => ChartX::DecodeSpeedup,
                ChartX::DecodeSpeedup => ChartX::BlocksSkipped,
            }
        }
        KeyCode::Char('y') => {
            app.chart_y = match app.chart_y {
                ChartY::Kl => ChartY::Perplexity,
                ChartY::Perplexity => ChartY::Kl,
            }
        }
        KeyCode::Char('p') => return app.generate(false),
        KeyCode::Char('d') => return app.generate(true),
        KeyCode::Char('e') => {
            let prompt = app.gen.prompt.clone();
            open_input(app, InputKind::Prompt, prompt);
        }
        KeyCode::Char('s') => {
            let path = app.save_path.display().to_string();
            open_input(app, InputKind::SavePath, path);
        }
        KeyCode::Char('o') => {
            let path = app.save_path.display().to_string();
            open_input(app, InputKind::OpenPath, path);
        }
        _ => {}
    }
    vec![]
}

fn open_input(app: &mut App, kind: InputKind, text: String) {
    app.mode = Mode::Input { kind, text };
}

fn history_key(app: &mut App, key: KeyEvent, selected: usize) -> Vec<Request> {
    let last = app.history.len() - 1;
    match key.code {
        KeyCode::Up | KeyCode::Char('k') => {
            app.mode = Mode::History {
                selected: selected.saturating_sub(1),
            }
        }
        KeyCode::Down | KeyCode::Char('j') => {
            app.mode = Mode::History {
                selected: (selected + 1).min(last),
            }
        }
        KeyCode::Enter => {
            app.mode = Mode::Normal;
            return app.jump(selected);
        }
        KeyCode::Esc | KeyCode::Char('q') | KeyCode::Char('H') => app.mode = Mode::Normal,
        _ => {}
    }
    vec![]
}

fn input_key(app: &mut App, key: KeyEvent, kind: InputKind, mut text: String) -> Vec<Request> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    match key.code {
        KeyCode::Esc => {
            app.mode = Mode::Normal;
            return vec![];
        }
        KeyCode::Enter => {
            app.mode = Mode::Normal;
            return submit(app, kind, text);
        }
        KeyCode::Backspace => {
            text.pop();
        }
        KeyCode::Char('u') if ctrl => text.clear(),
        KeyCode::Char(c) if !ctrl => text.push(c),
        _ => {}
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
                Ok((plan, notes)) => {
                    if app.search_running() {
                        app.set_status("a search is changing the plan; Esc cancels it first", true);
                        return vec![];
                    }
                    app.save_path = path.clone();
                    let reqs = app.push_plan(plan);
                    let notes: String = notes.iter().map(|n| format!("; {n}")).collect();
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
    if app.mode != Mode::Normal || ui::too_small(screen) {
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
