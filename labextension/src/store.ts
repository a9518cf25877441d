import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { IEngine, requestAPI } from './api';

/**
 * Polls the engines list and tells its views. One store feeds the sidebar panel and the
 * status bar, so they agree and the server is asked once per period.
 */
export class EngineStore {
  constructor(periodMs = 2000) {
    this._periodMs = periodMs;
  }

  get engines(): IEngine[] {
    return this._engines;
  }

  /** Why the last poll failed, or null. */
  get error(): string | null {
    return this._error;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  start(): void {
    if (this._timer === null) {
      void this.refresh();
      this._timer = window.setInterval(() => void this.refresh(), this._periodMs);
    }
  }

  async refresh(): Promise<void> {
    try {
      const reply = await requestAPI<{ engines: IEngine[] }>('engines');
      this._engines = reply.engines;
      this._error = null;
    } catch (error) {
      this._engines = [];
      this._error = `The workbench server extension did not answer: ${error}`;
    }
    this._changed.emit();
  }

  async stop(id: string): Promise<void> {
    await requestAPI(`engines/${encodeURIComponent(id)}/stop`, { method: 'POST' });
    await this.refresh();
  }

  dispose(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  private _periodMs: number;
  private _timer: number | null = null;
  private _engines: IEngine[] = [];
  private _error: string | null = null;
  private _changed = new Signal<this, void>(this);
}

/** A widget that renders again each time the store has news. */
export abstract class StoreView extends Widget {
  constructor(store: EngineStore, className: string) {
    super();
    this.addClass(className);
    this.store = store;
    store.changed.connect(this.render, this);
  }

  dispose(): void {
    this.store.changed.disconnect(this.render, this);
    super.dispose();
  }

  protected abstract render(): void;

  protected readonly store: EngineStore;
}
