"""The Kivy app: Screening, Result, History and Settings screens over one worker thread.

Everything slow (loading a model, screening an image) runs on a single worker thread, so the
UI never freezes and screenings never overlap; results come back to the UI thread through
`Clock`. Every image goes through `open_file` (file list, drag and drop, camera), which
screens it with `edge_app.screening.screen`: committed to the history, then shown. A history
that cannot record (damaged, read-only, disk full) stops screening until staff start a new one
beside it (the old file is kept as it is) or the cause is fixed.
"""
from __future__ import annotations

import datetime
import glob
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kivy.app import App
from kivy.clock import Clock
from kivy.core.window import Window
from kivy.factory import Factory
from kivy.graphics.texture import Texture
from kivy.metrics import dp, sp
from kivy.properties import BooleanProperty, ListProperty, NumericProperty, StringProperty
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.button import Button
from kivy.uix.popup import Popup
from kivy.uix.screenmanager import NoTransition, Screen
from kivy.utils import platform

import numpy as np

from edge_app import decision
from edge_app.app import load_classifier
from edge_app.app.config import AppConfig
from edge_app.app.overlay import display_square, heatmap_rgba
from edge_app.classifier import Classifier
from edge_app.errors import CxrEdgeError, HistoryError, InputError, log_unexpected
from edge_app.history import History, beside, export_csv
from edge_app.inputs import IMAGE_SUFFIXES
from edge_app.screening import screen

DISPLAY_SIZE = 512
COLOURS = {decision.REFER: (0.72, 0.14, 0.14, 1), decision.NO_ABNORMALITY: (0.10, 0.45, 0.25, 1),
           decision.UNRELIABLE: (0.80, 0.45, 0.05, 1)}
VERDICTS = {decision.REFER: "REFER", decision.NO_ABNORMALITY: "no abnormality",
            decision.UNRELIABLE: "UNRELIABLE"}


def camera_available() -> bool:
    """A camera device and a Kivy camera provider (on Linux, a /dev/video node must exist)."""
    if platform == "linux" and not glob.glob("/dev/video*"):
        return False
    try:
        from kivy.core.camera import Camera as CoreCamera
    except Exception:  # noqa: BLE001 - a broken provider means no camera, not a crash
        return False
    return CoreCamera is not None


class ProbabilityBar(BoxLayout):
    text = StringProperty("")
    value = NumericProperty(0.0)
    marker = NumericProperty(-1.0)        # the operating threshold on this bar, if any
    colour = ListProperty([0.3, 0.55, 0.85, 1])


class ScreeningScreen(Screen):
    folder = StringProperty("")

    def browse(self, folder) -> None:
        """Lists a folder: its sub-folders, then the images it holds (unreadable: stays put)."""
        folder = Path(folder).resolve()
        try:
            entries = sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name.lower()))
        except OSError as exc:
            App.get_running_app().error = f"Cannot open the folder {folder}: {exc.strerror or exc}"
            return
        self.folder = str(folder)
        rows = [{"text": "[..]  up one folder", "path": str(folder.parent), "is_dir": True}]
        rows += [{"text": f"[{p.name}]" if p.is_dir() else p.name, "path": str(p), "is_dir": p.is_dir()}
                 for p in entries if not p.name.startswith(".")
                 and (p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES)]
        self.ids.files.data = rows
        self.ids.files.scroll_y = 1

    def pick(self, path: str, is_dir: bool) -> None:
        """The file list's handler: a folder opens, an image is screened."""
        if is_dir:
            self.browse(path)
        else:
            App.get_running_app().open_file(path)


class ResultScreen(Screen):
    def show(self, outcome, square: np.ndarray, overlay: np.ndarray | None) -> None:
        p = outcome.prediction
        self.ids.xray.texture = _texture(square, "luminance")
        self.ids.heat.texture = None if overlay is None else _texture(overlay, "rgba")
        self.ids.heat_toggle.disabled = overlay is None
        self.ids.message.text = p.message
        self.ids.message.colour = COLOURS[p.decision]
        bars = self.ids.bars
        bars.clear_widgets()
        bars.add_widget(ProbabilityBar(text="abnormal", value=p.abnormal_probability, marker=p.threshold,
                                       colour=COLOURS[p.decision]))
        for label, value in p.probabilities.items():
            bars.add_widget(ProbabilityBar(text=label, value=value))
        t = p.timings_ms
        likely = (f"No label: {decision.WARNING_SHORT[p.warning]}." if p.warning
                  else f"Most likely: {p.label}.")
        self.ids.details.text = (f"{likely} {Path(outcome.screening.image_path).name}\n"
                                 f"Operating {App.get_running_app().classifier.threshold_note}.\n"
                                 f"{t['total']:.0f} ms (inference {t['inference']:.0f} ms) on {p.backend}")

    def clear(self) -> None:
        self.ids.xray.texture = self.ids.heat.texture = None
        self.ids.bars.clear_widgets()
        self.ids.message.text = self.ids.details.text = ""


class HistoryScreen(Screen):
    def on_pre_enter(self, *_):
        self.search()

    def search(self) -> list:
        app = App.get_running_app()
        if app.history is None:
            app.status = "No history is open."
            return []
        since, until = self.ids.since.text.strip(), self.ids.until.text.strip()
        for day in (since, until):
            if day and not _is_date(day):
                app.status = f"Dates are written YYYY-MM-DD (got {day!r})."
                return []
        label = self.ids.label.text
        try:
            self.rows = app.history.search(self.ids.text.text.strip(), label=None if label == "any result" else label,
                                           since=since or None, until=until or None)
        except HistoryError as exc:
            app.history_failed(exc)
            app.error = f"[{exc.code}] {exc.message}"
            return []
        self.ids.list.data = [{"text": _history_line(s)} for s in self.rows]
        app.status = f"{len(self.rows)} screening(s) found."
        return self.rows

    def export(self) -> Path:
        app = App.get_running_app()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        Path(app.cfg.exports).mkdir(parents=True, exist_ok=True)
        path = export_csv(self.search(), Path(app.cfg.exports) / f"screenings-{stamp}.csv")
        app.status = f"Exported {len(self.rows)} screening(s) to {path}"
        return path


class SettingsScreen(Screen):
    def on_pre_enter(self, *_):
        cfg = App.get_running_app().cfg
        self.ids.model.text = cfg.model or ""
        self.ids.threads.text = str(cfg.threads)
        self.ids.accelerator.text = cfg.accelerator

    def apply(self) -> None:
        app = App.get_running_app()
        app.cfg.model = self.ids.model.text.strip() or None
        app.cfg.threads = int(self.ids.threads.text)
        app.cfg.accelerator = self.ids.accelerator.text
        try:
            app.cfg.save()
        except OSError as exc:
            app.error = f"Settings not saved ({exc}); they apply until the app closes."
        app.load_model()


class PinPopup(Popup):
    """A numeric keypad: large keys for a touch screen without a keyboard."""

    entered = StringProperty("")

    def __init__(self, on_pin, on_key=lambda: None, **kwargs):
        super().__init__(**kwargs)
        self._on_pin, self._on_key = on_pin, on_key

    def key(self, k: str) -> None:
        self._on_key()      # typing a PIN is activity: the kiosk's idle reset waits
        if k == "del":
            self.entered = self.entered[:-1]
        elif k == "ok":
            self.dismiss()
            self._on_pin(self.entered)
        elif len(self.entered) < 12:
            self.entered += k


class CxrApp(App):
    title = "cxr-edge: chest X-ray screening aid"
    kv_file = str(Path(__file__).with_name("cxr.kv"))   # loaded by App.run, before build
    busy = BooleanProperty(False)
    status = StringProperty("")
    error = StringProperty("")
    model_status = StringProperty("No model loaded.")
    card_text = StringProperty("")
    labels = ListProperty([])             # the loaded model's classes (its card's): the history's label filter
    staff = BooleanProperty(False)        # kiosk: staff PIN entered (until the idle reset)
    target = NumericProperty(dp(48))      # height of touch targets
    font = NumericProperty(sp(17))
    notice = StringProperty(f"{decision.NOT_A_DIAGNOSIS}. Every result must be reviewed by a "
                            f"qualified clinician.")
    has_camera = BooleanProperty(False)
    history_problem = StringProperty("")  # why the history cannot record: screening stops meanwhile

    def __init__(self, cfg: AppConfig, *, worker: ThreadPoolExecutor | None = None, loading=None, **kwargs):
        """`worker`: the single worker thread (one is made if None); `loading`: its future of
        cfg.model's Classifier, when the launch started loading it before Kivy (app.run)."""
        super().__init__(**kwargs)
        self.cfg = cfg
        self.classifier: Classifier | None = None
        self.history: History | None = None
        self.open_history(cfg.history)
        self.last_outcome = None
        self._worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="screening")
        self._loading = loading
        self._exit_allowed = not cfg.kiosk
        self._popup = None
        self.exit_code = 0
        if cfg.kiosk:
            self.target, self.font = dp(72), sp(24)

    # -- lifecycle ---------------------------------------------------------------------------
    def build(self):
        root = Factory.Root()
        self.sm = root.ids.sm
        self.sm.transition = NoTransition()
        for screen in (ScreeningScreen(name="screening"), ResultScreen(name="result"),
                       HistoryScreen(name="history"), SettingsScreen(name="settings")):
            self.sm.add_widget(screen)
        self.has_camera = camera_available()
        self.bind(staff=lambda *_: self._build_nav())
        self.sm.bind(current=lambda *_: self._build_nav())
        self.nav = root.ids.nav
        self._build_nav()
        self.sm.get_screen("screening").browse(self.cfg.start_dir)
        Window.bind(on_drop_file=self._on_drop_file, on_request_close=self._on_request_close,
                    on_touch_down=self._activity, on_key_down=self._activity)
        self._idle = Clock.create_trigger(self.reset_to_start, self.cfg.idle_reset_s)
        self.load_model()
        return root

    def on_start(self):
        self._activity()

    def on_stop(self):
        self._worker.shutdown(wait=True)
        if self.history is not None:
            self.history.close()

    # -- history -------------------------------------------------------------------------------
    def open_history(self, path) -> bool:
        """Opens (or creates) the history at `path`; on failure, screening stops with the reason."""
        try:
            history = History(path)
        except HistoryError as exc:
            self.history_failed(exc)
            return False
        if self.history is not None:
            self.history.close()
        self.history, self.history_problem, self.error = history, "", ""
        return True

    def history_failed(self, exc: HistoryError) -> None:
        self.history_problem = f"Screening is stopped [{exc.code}]. {exc.message}\nFile: {exc.path}"

    def start_new_history(self) -> None:
        """Goes on with a fresh history file beside the configured one, which is kept as it is."""
        old = self.cfg.history
        new = beside(old)
        if not self.open_history(new):
            return
        self.cfg.history = str(new)
        try:
            self.cfg.save()
        except OSError as exc:
            self.error = f"Settings not saved ({exc}); the app uses {new} until it closes."
        self.status = f"New history started: {new}. The previous file was kept: {old}"

    def retry_history(self) -> None:
        if self.open_history(self.cfg.history):
            self.status = "The history records again: screening can go on."

    # -- screening -----------------------------------------------------------------------------
    def open_file(self, path) -> None:
        """The one way in for an image: file list, drag and drop and camera all call this."""
        self._activity()
        path = os.fsdecode(path)
        if self.classifier is None:
            self.error = "No model is loaded: choose a model file in Settings."
            return
        if self.history_problem:
            self.error = "Screening is stopped until the history can record results (see below)."
            return
        if self.busy:
            self.status = "Still working on the previous image; try again in a moment."
            return
        self.error, self.status = "", f"Screening {Path(path).name} ..."
        classifier = self.classifier
        self._run(lambda: self._screen(classifier, path), self._screened)

    def _screen(self, classifier: Classifier, path: str):
        """On the worker: screen and commit, then prepare what the Result screen draws."""
        outcome = screen(classifier, self.history, path)
        if outcome.prediction is None:
            return outcome, None, None
        square = display_square(path, classifier.spec, DISPLAY_SIZE)
        heat = outcome.prediction.heatmap
        return outcome, square, None if heat is None else heatmap_rgba(heat, DISPLAY_SIZE)

    def _screened(self, result) -> None:
        outcome, square, overlay = result
        self.last_outcome = outcome
        if outcome.error is not None:   # shown where the next image is chosen, not over an old result
            self.error = _error_message(outcome.error)
            self.status = ""
            self.sm.current = "screening"
        else:
            self.sm.get_screen("result").show(outcome, square, overlay)
            self.status = f"Screening #{outcome.screening.id} saved to the history."
            self.sm.current = "result"
            self._build_nav()
        if self.cfg.screen_and_exit:   # on the next frame: this one draws the result
            Clock.schedule_once(lambda _dt: self._first_result_shown(outcome))

    def _first_result_shown(self, outcome) -> None:
        """--screen-and-exit: the result was drawn; say so on stdout and exit (1 if it failed)."""
        p = outcome.prediction
        print(f"first result: {outcome.screening.image_path}: " + (
            f"cannot screen [{outcome.error.code}]" if p is None else f"{p.decision} ({p.label})"), flush=True)
        self.exit_code = 0 if p is not None else 1
        self.stop()

    def load_model(self) -> None:
        cfg = self.cfg
        if not cfg.model:
            self.model_status, self.card_text = "No model loaded: enter a .tflite file in Settings.", ""
            self.sm.current = "settings"
            return
        self.classifier = None
        self.model_status = f"Loading {cfg.model} ..."
        loading, self._loading = self._loading, None
        if loading is not None:   # the launch's model, loading since before the window opened
            self._follow(loading, self._model_loaded)
        else:
            self._run(lambda: load_classifier(cfg), self._model_loaded)

    def _model_loaded(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.labels = list(classifier.card.labels)
        info = classifier.info
        gpu = {True: "GPU runs every op", False: "GPU runs part of the model", None: "no GPU"}
        self.model_status = f"{Path(info['model']).name} on {info['backend']} ({gpu[info['gpu_fully_accelerated']]})"
        tried = "".join(f"\n  not used: {t['backend']}: {t['error'][:160]}" for t in info["backends_tried"])
        card = info["card"]
        self.card_text = "\n".join([f"Operating {info['threshold_note']}",
                                    f"Model SHA-256: {info['model_sha256']}", f"Backend: {info['backend']}{tried}"]
                                   + [f"{k}: {_plain(v)}" for k, v in card.items()])
        self.status = f"{'Model loaded' if self.history_problem else 'Ready'}: {self.model_status}."
        if self.cfg.screen_and_exit:
            self.open_file(self.cfg.screen_and_exit)

    def _run(self, job, done) -> None:
        """Runs `job` on the worker; `done(result)` or the error message on the UI thread."""
        self._follow(self._worker.submit(job), done)

    def _follow(self, future, done) -> None:
        """`done(result)` or the error message on the UI thread once the worker's `future` is done."""
        self.busy = True

        def finished(future):
            Clock.schedule_once(lambda _dt: self._finished(future, done))
        future.add_done_callback(finished)

    def _finished(self, future, done) -> None:
        self.busy = False
        exc = future.exception()
        if exc is None:
            done(future.result())
            return
        self.status = ""
        if self.cfg.screen_and_exit:   # no first result will come
            print(f"no result: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.exit_code = 2
            self.stop()
        if isinstance(exc, HistoryError):   # nothing is shown that the history does not hold
            self.history_failed(exc)
            self.error = "This screening could not be recorded, so it is not shown."
            self.sm.current = "screening"
            return
        self.error = _error_message(exc)
        if not isinstance(exc, CxrEdgeError):   # a bug: its traceback goes to the error log
            self.error += f" ({log_unexpected(exc, 'app')})"
        if not isinstance(exc, InputError) and self.classifier is None:
            self.model_status = f"Model not loaded: {_error_message(exc)}"

    def _on_drop_file(self, _window, filename, *_args) -> None:
        self.open_file(filename)

    # -- camera ----------------------------------------------------------------------------
    def open_camera(self) -> None:
        from kivy.uix.camera import Camera

        box = BoxLayout(orientation="vertical")
        camera = Camera(play=True)
        box.add_widget(camera)
        capture = Button(text="Capture and screen", size_hint_y=None, height=self.target, font_size=self.font)
        box.add_widget(capture)
        popup = self._open_popup(Popup(title="Camera", content=box, size_hint=(0.95, 0.95)))

        def take(*_):
            Path(self.cfg.exports).mkdir(parents=True, exist_ok=True)
            path = Path(self.cfg.exports) / f"capture-{datetime.datetime.now():%Y%m%d-%H%M%S}.png"
            camera.export_to_png(str(path))
            camera.play = False
            popup.dismiss()
            self.open_file(path)
        capture.bind(on_release=take)

    # -- kiosk -------------------------------------------------------------------------------
    def _build_nav(self) -> None:
        items = [("Screening", "screening")]
        if self.last_outcome is not None and self.last_outcome.prediction is not None:
            items.append(("Result", "result"))
        if not self.cfg.kiosk or self.staff:
            items += [("History", "history"), ("Settings", "settings")]
        if self.cfg.kiosk:
            items.append(("Exit", None) if self.staff else ("Staff", None))
        self.nav.clear_widgets()
        for text, name in items:
            button = Button(text=text, font_size=self.font, disabled=name is not None and self.sm.current == name)
            button.bind(on_release=lambda _b, n=name, t=text: self.go(n) if n else
                        (self.exit_app() if t == "Exit" else self.ask_pin(self._unlock)))
            self.nav.add_widget(button)

    def go(self, name: str) -> None:
        self.error = ""
        self.sm.current = name

    def ask_pin(self, then) -> None:
        def check(pin):
            if self.check_pin(pin):
                then()
            else:
                self.error = "Wrong PIN."
        self._activity()    # someone is at the kiosk: the idle reset must not close the PIN pad on them
        self._open_popup(PinPopup(on_pin=check, on_key=self._activity))

    def check_pin(self, pin: str) -> bool:
        return bool(self.cfg.kiosk_pin) and pin == str(self.cfg.kiosk_pin)

    def _unlock(self) -> None:
        self.staff = True
        self.status = "Staff mode: History, Settings and Exit are unlocked until the kiosk is idle."

    def exit_app(self) -> None:
        if self._exit_allowed:
            self.stop()
        else:
            self.ask_pin(self._exit)

    def _exit(self) -> None:
        self._exit_allowed = True
        self.stop()

    def _on_request_close(self, *_args, **_kwargs) -> bool:
        """The window manager's close or Escape: refused in kiosk mode without the PIN."""
        if self._exit_allowed:
            return False
        self.ask_pin(self._exit)
        return True

    def _activity(self, *_args) -> None:
        if self.cfg.kiosk:
            self._idle.cancel()
            self._idle()

    def reset_to_start(self, *_args) -> None:
        """Kiosk idle: back to an empty start screen, staff locked, nothing of the last person shown."""
        if self._popup is not None:
            self._popup.dismiss()
        self.staff = False
        self.last_outcome = None
        self.sm.get_screen("result").clear()
        self.sm.get_screen("screening").browse(self.cfg.start_dir)
        self.error, self.status = "", ""
        self.sm.current = "screening"
        self._build_nav()

    def _open_popup(self, popup):
        self._popup = popup
        popup.bind(on_dismiss=lambda *_: setattr(self, "_popup", None))
        popup.open()
        return popup


def _texture(array: np.ndarray, colorfmt: str) -> Texture:
    height, width = array.shape[:2]
    texture = Texture.create(size=(width, height), colorfmt=colorfmt)
    texture.blit_buffer(np.ascontiguousarray(array[::-1]).tobytes(), colorfmt=colorfmt, bufferfmt="ubyte")
    return texture


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, CxrEdgeError):
        where = f"{Path(exc.path).name}: " if exc.path else ""
        return f"Cannot use this file [{exc.code}]: {where}{exc.message}"
    return f"Something went wrong ({type(exc).__name__}: {exc}); the app goes on."


def _plain(value) -> str:
    """A model card value for people: floats to 4 digits, dicts and lists without brackets."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_plain, value))
    return str(value)


def _history_line(s) -> str:
    when = s.screened_at[:19].replace("T", " ")
    name = Path(s.image_path).name
    sha = (s.image_sha256 or "-")[:10]
    if s.ok:
        why = f" ({decision.WARNING_SHORT[s.warning]})" if s.warning else ""
        return (f"{when}  {VERDICTS[s.decision]:<14}  {s.label:<9} P(abn) {s.abnormal_probability:.2f}  {name}  "
                f"#{sha}{why}")
    return f"{when}  NOT SCREENED [{s.error_code}]  {name}  #{sha}"


def _is_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True
