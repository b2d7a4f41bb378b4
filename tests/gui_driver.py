"""Drives the real Kivy app in its own process, for tests/test_app_gui.py (never imports TensorFlow).

  python tests/gui_driver.py SCENARIO OUT_DIR IMAGES_JSON -- APP_FLAGS...

A scenario is a generator run on Kivy's clock: it acts through the app's own handlers (the ones
the file list, drag and drop and the window call), yields a condition to wait for (a callable)
or a pause in seconds, and writes what it saw to OUT_DIR/result.json, screenshots beside it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edge_app.app import make_app
from edge_app.app.config import add_arguments, from_args

TIMEOUT_S = 120


def shot(out: Path, name: str) -> str:
    from kivy.core.window import Window

    path = Path(Window.screenshot(name=str(out / f"{name}.png")))
    final = out / f"{name}.png"
    path.rename(final)
    return str(final)


def texts(widget) -> list[str]:
    """Every label's text under a widget (what a person can read there)."""
    from kivy.uix.label import Label

    found = [widget.text] if isinstance(widget, Label) and widget.text else []
    for child in widget.children:
        found += texts(child)
    return found


def idle(app):
    return lambda: app.classifier is not None and not app.busy


def outcome(app) -> dict:
    o = app.last_outcome
    result = app.sm.get_screen("result")
    return {"screening_id": o.screening.id, "prediction": o.prediction.to_dict(),
            "screen": app.sm.current, "message": result.ids.message.text,
            "bars": [b.text for b in reversed(result.ids.bars.children)]}


def scenario_screen(app, out, images, seen):
    from kivy.core.window import Window

    yield idle(app)
    yield 0.3
    seen["screenshots"] = {"screening": shot(out, "screening")}
    app._on_drop_file(Window, images["good"][0].encode(), 20, 20)     # what a drop calls
    yield idle(app)
    yield 0.3
    seen["first"] = outcome(app)
    seen["screenshots"]["result"] = shot(out, "result")
    app.sm.get_screen("screening").pick(images["bad"], False)          # what the file list calls
    yield idle(app)
    yield 0.3
    seen["bad"] = {"error": app.error, "screen": app.sm.current, "visible": texts(app.root)}
    seen["screenshots"]["error"] = shot(out, "error")
    seen["next"] = []
    for image in images["good"][1:]:
        app.sm.get_screen("screening").pick(image, False)
        yield idle(app)
        seen["next"].append(outcome(app))
    app.go("history")
    yield 0.3
    seen["history_rows"] = [row["text"] for row in app.sm.get_screen("history").ids.list.data]
    seen["screenshots"]["history"] = shot(out, "history")
    history = app.sm.get_screen("history")
    seen["export"] = str(history.export())
    history.ids.text.text = Path(images["bad"]).name
    seen["search_bad"] = [row["text"] for row in (history.search() and history.ids.list.data)]
    history.ids.text.text = ""
    seen["label_choices"] = list(history.ids.label.values)
    history.ids.label.text = seen["first"]["prediction"]["label"]      # the spinner searches at once
    seen["search_label"] = [row["text"] for row in history.ids.list.data]
    app.go("settings")
    yield 0.3
    seen["settings"] = texts(app.sm.get_screen("settings"))
    seen["screenshots"]["settings"] = shot(out, "settings")
    settings = app.sm.get_screen("settings")
    settings.ids.threads.text = "1"
    settings.apply()                                                   # reloads the model, saves
    yield idle(app)
    seen["after_apply"] = {"model_status": app.model_status, "threads": app.cfg.threads}
    settings.ids.model.text = str(out / "missing.tflite")
    settings.apply()
    yield lambda: not app.busy
    seen["bad_model"] = {"error": app.error, "model_status": app.model_status}
    app.open_file(images["good"][0])
    seen["bad_model"]["screen_error"] = app.error
    seen["camera_button"] = app.has_camera
    seen["notice_visible"] = app.root.ids.notice.height > 0 and app.root.ids.notice.text
    app.stop()


def scenario_broken_history(app, out, images, seen):
    """Opens on a history that cannot record: screening refused, then a new history started."""
    screening = app.sm.get_screen("screening")
    yield idle(app)
    yield 0.3
    seen["problem"] = app.history_problem
    seen["visible"] = texts(app.root)
    seen["files_disabled"] = screening.ids.files.disabled
    seen["new_history_button"] = not screening.ids.history_problem.disabled
    seen["screenshots"] = {"broken": shot(out, "broken_history")}
    screening.pick(images["good"][0], False)                            # what the file list calls
    yield 0.3
    seen["refused"] = {"error": app.error, "busy": app.busy, "outcome": app.last_outcome is not None}
    app.start_new_history()                                             # the button's handler
    yield 0.3
    seen["after_new"] = {"problem": app.history_problem, "history": app.cfg.history, "status": app.status,
                         "error": app.error,
                         "files_disabled": screening.ids.files.disabled}
    seen["screenshots"]["new"] = shot(out, "new_history")
    screening.pick(images["good"][0], False)
    yield idle(app)
    seen["screened"] = {"screen": app.sm.current, "id": app.last_outcome.screening.id}
    app.stop()


def scenario_kiosk(app, out, images, seen):
    from kivy.core.window import Window

    yield idle(app)
    seen["fullscreen"] = Window.fullscreen
    seen["window"] = list(Window.size)
    seen["nav"] = [b.text for b in reversed(app.nav.children)]
    seen["close_refused"] = Window.dispatch("on_request_close")       # window manager close / Escape
    yield 0.3
    popup = app._popup
    for key in "9999":
        popup.key(key)
    yield 0.3
    seen["screenshots"] = {"pin": shot(out, "kiosk_pin")}
    popup.key("ok")   # checks the PIN at once; read before the idle reset (2 s) can clear it
    seen["after_wrong_pin"] = {"error": app.error, "running": app.root_window is not None}
    yield 0.2
    app._on_drop_file(Window, images["good"][0].encode(), 20, 20)    # the last activity
    started = time.monotonic()
    yield lambda: app.sm.current == "result"
    yield 0.3
    seen["screenshots"]["result"] = shot(out, "kiosk_result")
    yield lambda: app.sm.current == "screening"                       # nobody touches it: idle reset
    seen["idle_reset_after_s"] = round(time.monotonic() - started, 2)
    seen["after_reset"] = {"result_message": app.sm.get_screen("result").ids.message.text,
                           "nav": [b.text for b in reversed(app.nav.children)]}
    app.ask_pin(app._unlock)
    for key in app.cfg.kiosk_pin + "!":
        app._popup.key("ok" if key == "!" else key)
    yield 0.2
    seen["staff_nav"] = [b.text for b in reversed(app.nav.children)]
    app.exit_app()
    yield 0.2
    for key in app.cfg.kiosk_pin + "!":
        app._popup.key("ok" if key == "!" else key)
    seen["exit_requested"] = True


def main() -> int:
    scenario, out, images = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(sys.argv[5:]))
    app = make_app(cfg)      # as `python -m edge_app app` starts it: the model loading before Kivy
    from kivy.clock import Clock
    seen: dict = {}
    steps = globals()[f"scenario_{scenario}"](app, out, images, seen)
    state = {"wait": None, "until": 0.0, "deadline": time.monotonic() + TIMEOUT_S}

    def tick(_dt):
        if time.monotonic() > state["deadline"]:
            seen["timeout"] = True
            app._exit()
            return False
        wait = state["wait"]
        if (callable(wait) and not wait()) or time.monotonic() < state["until"]:
            return True
        try:
            nxt = next(steps)
        except StopIteration:
            return False
        state["wait"], state["until"] = (nxt, 0.0) if callable(nxt) else (None, time.monotonic() + nxt)
        return True

    Clock.schedule_interval(tick, 0.05)
    app.run()
    seen["tensorflow_imported"] = "tensorflow" in sys.modules
    (out / "result.json").write_text(json.dumps(seen, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
