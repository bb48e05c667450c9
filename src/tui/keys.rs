//! Every key binding, declared once (gitui's `commands()` pattern): the
//! handler looks pressed keys up here, the command bar and the help screen
//! draw from here, so what is shown and what is handled cannot drift apart.
//! One table per mode; each action enum is matched exhaustively by the
//! handler, so a binding without a handler does not compile.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::app::{App, View};

/// A key as bound: its code and whether Ctrl is held (Shift is part of
/// the character; other modifiers are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub code: KeyCode,
    pub ctrl: bool,
}

impl Key {
    pub const fn ch(c: char) -> Self {
        Self {
            code: KeyCode::Char(c),
            ctrl: false,
        }
    }

    pub const fn ctrl(c: char) -> Self {
        Self {
            code: KeyCode::Char(c),
            ctrl: true,
        }
    }

    pub const fn code(code: KeyCode) -> Self {
        Self { code, ctrl: false }
    }

    pub fn matches(&self, ev: &KeyEvent) -> bool {
        self.code == ev.code && self.ctrl == ev.modifiers.contains(KeyModifiers::CONTROL)
    }

    /// How the help writes this key (`^r`, `←`, `space`).
    pub fn glyph(&self) -> String {
        let base = match self.code {
            KeyCode::Char(' ') => "space".to_string(),
            KeyCode::Char(c) => c.to_string(),
            KeyCode::Left => "←".into(),
            KeyCode::Right => "→".into(),
            KeyCode::Up => "↑".into(),
            KeyCode::Down => "↓".into(),
            KeyCode::Home => "home".into(),
            KeyCode::End => "end".into(),
            KeyCode::Enter => "enter".into(),
            KeyCode::Esc => "esc".into(),
            other => format!("{other:?}").to_lowercase(),
        };
        if self.ctrl {
            format!("^{base}")
        } else {
            base
        }
    }

    /// The event this key sends (for tests).
    pub fn event(&self) -> KeyEvent {
        let mods = if self.ctrl {
            KeyModifiers::CONTROL
        } else {
            KeyModifiers::NONE
        };
        KeyEvent::new(self.code, mods)
    }
}

/// Quits from any mode, even while typing.
pub const FORCE_QUIT: Key = Key::ctrl('c');

/// When a command can run; otherwise the handler says why and does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// Only while a background job (importance, search, fit) runs.
    JobRunning,
    /// Only while no background job runs.
    NoJob,
    /// Only in this view (its panel is on screen).
    InView(View),
}

impl When {
    pub fn holds(self, app: &App) -> bool {
        match self {
            When::Always => true,
            When::JobRunning => app.job.is_some(),
            When::NoJob => app.job.is_none(),
            When::InView(v) => app.view == v,
        }
    }

    /// Why it cannot run now, and whether that is an error.
    pub fn refusal(self) -> (String, bool) {
        match self {
            When::Always => (String::new(), false),
            When::JobRunning => ("no background job to cancel".into(), false),
            When::NoJob => ("a background job is running; Esc cancels it".into(), true),
            When::InView(v) => (format!("only in the {} view; v switches", v.label()), false),
        }
    }
}

/// One entry of the command bar: `(rank, key, name)`, lowest rank first.
pub type BarEntry = (u8, &'static str, &'static str);

/// One line of the help: the keys as shown, what they do, and each key's action.
#[derive(Debug)]
pub struct Command<A: 'static> {
    pub keys: &'static str,
    pub description: &'static str,
    pub bindings: &'static [(Key, A)],
    pub bar: &'static [BarEntry],
    pub when: When,
}

impl<A> Command<A> {
    const fn new(
        keys: &'static str,
        description: &'static str,
        bindings: &'static [(Key, A)],
    ) -> Self {
        Self {
            keys,
            description,
            bindings,
            bar: &[],
            when: When::Always,
        }
    }

    const fn bar(mut self, bar: &'static [BarEntry]) -> Self {
        self.bar = bar;
        self
    }

    const fn when(mut self, when: When) -> Self {
        self.when = when;
        self
    }
}

/// Help groups the main screen's commands by the panel they act on.
pub struct Group {
    pub name: &'static str,
    pub commands: &'static [Command<Action>],
}

/// What a key does on the main screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Left,
    Right,
    Up,
    Down,
    FirstLayer,
    LastLayer,
    Toggle,
    Clear,
    Metric,
    Undo,
    Redo,
    History,
    Save,
    Open,
    Search,
    Fit,
    CancelJob,
    ChartX,
    ChartY,
    Generate,
    Draft,
    EditPrompt,
    View,
    EarlierTokens,
    LaterTokens,
    RouteAgain,
    KvPolicy,
    KvBudgetUp,
    KvBudgetDown,
    KvAttach,
    KvLong,
    Help,
    Quit,
}

/// What a key does in the history list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryAction {
    Previous,
    Next,
    Jump,
    Close,
}

/// What a key does while a text prompt is open (other keys type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputAction {
    Submit,
    Cancel,
    ClearText,
    DeleteChar,
}

use Action as A;

/// The block-surgery view's panels: grid, metrics, chart.
const BLOCKS: When = When::InView(View::Blocks);

pub const MAIN: &[Group] = &[
    Group {
        name: "Block grid",
        commands: &[
            Command::new(
                "←↓↑→ hjkl",
                "move between blocks",
                &[
                    (Key::code(KeyCode::Left), A::Left),
                    (Key::code(KeyCode::Down), A::Down),
                    (Key::code(KeyCode::Up), A::Up),
                    (Key::code(KeyCode::Right), A::Right),
                    (Key::ch('h'), A::Left),
                    (Key::ch('j'), A::Down),
                    (Key::ch('k'), A::Up),
                    (Key::ch('l'), A::Right),
                ],
            )
            .bar(&[(2, "hjkl", "move")])
            .when(BLOCKS),
            // Mouse only: the handler's click path, listed so the help shows it.
            Command::new(
                "click",
                "select a block; click again or right-click: skip",
                &[],
            ),
            Command::new(
                "0 / $",
                "first / last layer (home / end too)",
                &[
                    (Key::ch('0'), A::FirstLayer),
                    (Key::code(KeyCode::Home), A::FirstLayer),
                    (Key::ch('$'), A::LastLayer),
                    (Key::code(KeyCode::End), A::LastLayer),
                ],
            )
            .when(BLOCKS),
            Command::new(
                "space enter",
                "skip or restore the block (re-evaluates)",
                &[
                    (Key::ch(' '), A::Toggle),
                    (Key::code(KeyCode::Enter), A::Toggle),
                ],
            )
            .bar(&[(1, "space", "skip")])
            .when(BLOCKS),
            Command::new(
                "c",
                "clear: back to the base model",
                &[(Key::ch('c'), A::Clear)],
            ),
            Command::new(
                "m",
                "colour by Δloss / block influence",
                &[(Key::ch('m'), A::Metric)],
            )
            .bar(&[(10, "m", "metric")])
            .when(BLOCKS),
        ],
    },
    Group {
        name: "Plans and history",
        commands: &[
            Command::new(
                "u  U ^r",
                "undo / redo",
                &[
                    (Key::ch('u'), A::Undo),
                    (Key::ch('U'), A::Redo),
                    (Key::ctrl('r'), A::Redo),
                ],
            )
            .bar(&[(3, "u", "undo")]),
            Command::new(
                "H",
                "history list: jump to any earlier plan",
                &[(Key::ch('H'), A::History)],
            )
            .bar(&[(11, "H", "history")]),
            Command::new(
                "s / o",
                "save / open a plan file",
                &[(Key::ch('s'), A::Save), (Key::ch('o'), A::Open)],
            )
            .bar(&[(8, "s", "save"), (9, "o", "open")]),
        ],
    },
    Group {
        name: "Search and fit",
        commands: &[
            Command::new(
                "S",
                "Hopscotch: skip K attention blocks (asks K)",
                &[(Key::ch('S'), A::Search)],
            )
            .bar(&[(4, "S", "search")])
            .when(When::NoJob),
            Command::new(
                "F",
                "fit Hopscotch scales for the current plan",
                &[(Key::ch('F'), A::Fit)],
            )
            .bar(&[(5, "F", "fit")])
            .when(When::NoJob),
            Command::new(
                "esc",
                "cancel the running search, fit or scoring",
                &[(Key::code(KeyCode::Esc), A::CancelJob)],
            )
            .bar(&[(0, "esc", "cancel job")])
            .when(When::JobRunning),
        ],
    },
    Group {
        name: "Chart",
        commands: &[
            Command::new(
                "x",
                "x axis: skipped / decode × / draft × (after d)",
                &[(Key::ch('x'), A::ChartX)],
            )
            .when(BLOCKS),
            Command::new("y", "y axis: KL / perplexity", &[(Key::ch('y'), A::ChartY)]).when(BLOCKS),
        ],
    },
    Group {
        name: "Generation",
        commands: &[
            Command::new(
                "p",
                "run the prompt through base and plan",
                &[(Key::ch('p'), A::Generate)],
            )
            .bar(&[(6, "p", "generate")]),
            Command::new(
                "d",
                "plan drafts, full model verifies (lossless)",
                &[(Key::ch('d'), A::Draft)],
            )
            .bar(&[(7, "d", "draft")]),
            Command::new("e", "edit the prompt", &[(Key::ch('e'), A::EditPrompt)]),
        ],
    },
    Group {
        name: "Routing view",
        commands: &[Command::new(
            "[ ] r",
            "earlier / later tokens / route the prompt again",
            &[
                (Key::ch('['), A::EarlierTokens),
                (Key::ch(']'), A::LaterTokens),
                (Key::ch('r'), A::RouteAgain),
            ],
        )
        .bar(&[(2, "[ ]", "tokens"), (3, "r", "route")])
        .when(When::InView(View::Routing))],
    },
    Group {
        name: "KV view",
        commands: &[
            Command::new(
                "t",
                "next policy: quest/streaming/window/h2o/snapkv",
                &[(Key::ch('t'), A::KvPolicy)],
            )
            .bar(&[(2, "t", "policy")])
            .when(When::InView(View::Kv)),
            Command::new(
                "+ = -",
                "double / halve the budget (16 to 4096 tokens)",
                &[
                    (Key::ch('+'), A::KvBudgetUp),
                    (Key::ch('='), A::KvBudgetUp),
                    (Key::ch('-'), A::KvBudgetDown),
                ],
            )
            .bar(&[(3, "+", "budget")])
            .when(When::InView(View::Kv)),
            Command::new(
                "a",
                "put the policy in the saved plan / take it out",
                &[(Key::ch('a'), A::KvAttach)],
            )
            .bar(&[(4, "a", "attach")])
            .when(When::InView(View::Kv)),
            Command::new(
                "L",
                "measure it at 2,048 tokens vs the full cache",
                &[(Key::ch('L'), A::KvLong)],
            )
            .bar(&[(5, "L", "long context")])
            .when(When::InView(View::Kv)),
        ],
    },
    Group {
        name: "Anywhere",
        commands: &[
            Command::new(
                "v",
                "view: blocks / speculative / routing / KV",
                &[(Key::ch('v'), A::View)],
            )
            .bar(&[(14, "v", "view")]),
            Command::new("?", "this help", &[(Key::ch('?'), A::Help)]).bar(&[(12, "?", "help")]),
            Command::new(
                "q  ^c",
                "quit (the session is autosaved)",
                &[(Key::ch('q'), A::Quit), (FORCE_QUIT, A::Quit)],
            )
            .bar(&[(13, "q", "quit")]),
        ],
    },
];

pub const HISTORY: &[Command<HistoryAction>] = &[
    Command::new(
        "↑↓ jk",
        "select",
        &[
            (Key::code(KeyCode::Up), HistoryAction::Previous),
            (Key::ch('k'), HistoryAction::Previous),
            (Key::code(KeyCode::Down), HistoryAction::Next),
            (Key::ch('j'), HistoryAction::Next),
        ],
    )
    .bar(&[(0, "↑↓", "select")]),
    Command::new(
        "enter",
        "jump",
        &[(Key::code(KeyCode::Enter), HistoryAction::Jump)],
    )
    .bar(&[(1, "enter", "jump")]),
    Command::new(
        "esc q H",
        "close",
        &[
            (Key::code(KeyCode::Esc), HistoryAction::Close),
            (Key::ch('q'), HistoryAction::Close),
            (Key::ch('H'), HistoryAction::Close),
        ],
    )
    .bar(&[(2, "esc", "close")]),
];

pub const INPUT: &[Command<InputAction>] = &[
    Command::new(
        "enter",
        "ok",
        &[(Key::code(KeyCode::Enter), InputAction::Submit)],
    )
    .bar(&[(0, "enter", "ok")]),
    Command::new(
        "esc",
        "cancel",
        &[(Key::code(KeyCode::Esc), InputAction::Cancel)],
    )
    .bar(&[(1, "esc", "cancel")]),
    Command::new("^u", "clear", &[(Key::ctrl('u'), InputAction::ClearText)])
        .bar(&[(2, "^u", "clear")]),
    Command::new(
        "backspace",
        "delete a character",
        &[(Key::code(KeyCode::Backspace), InputAction::DeleteChar)],
    ),
];

/// The bar while the help is open: any key closes it.
pub const HELP_BAR: &[(&str, &str)] = &[("any key", "close help")];

/// Every main-screen command, in help order.
pub fn main_commands() -> impl Iterator<Item = &'static Command<Action>> {
    MAIN.iter().flat_map(|g| g.commands.iter())
}

/// The command and action a key is bound to, if any.
pub fn find<'a, A: Copy + 'static>(
    commands: impl IntoIterator<Item = &'a Command<A>>,
    ev: &KeyEvent,
) -> Option<(&'a Command<A>, A)> {
    commands.into_iter().find_map(|c| {
        c.bindings
            .iter()
            .find(|(k, _)| k.matches(ev))
            .map(|(_, a)| (c, *a))
    })
}

/// The command bar's entries for the commands that can run now, by rank.
pub fn bar<'a, A: 'static>(
    commands: impl IntoIterator<Item = &'a Command<A>>,
    app: &App,
) -> Vec<(&'static str, &'static str)> {
    let mut entries: Vec<BarEntry> = commands
        .into_iter()
        .filter(|c| c.when.holds(app))
        .flat_map(|c| c.bar.iter().copied())
        .collect();
    entries.sort_by_key(|e| e.0);
    entries.into_iter().map(|(_, k, n)| (k, n)).collect()
}
