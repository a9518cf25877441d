import { EngineStore, StoreView } from './store';

/** The active model and its last decode speed, in JupyterLab's status bar. */
export class ModelStatus extends StoreView {
  constructor(store: EngineStore) {
    super(store, 'jp-Workbench-status');
    this.render();
  }

  protected render(): void {
    const live = this.store.engines.filter(e => e.model);
    if (live.length === 0) {
      this.node.textContent = 'Workbench: no model';
      this.node.title = 'No workbench engine has a model loaded';
      return;
    }
    // The most recently used engine is the active one.
    const e = live.reduce((a, b) =>
      (b.history.at(-1)?.t ?? 0) > (a.history.at(-1)?.t ?? 0) ? b : a
    );
    const tps = e.last_tps !== null ? ` · ${e.last_tps.toFixed(1)} tok/s` : '';
    this.node.textContent = `${e.model!.name}${tps}`;
    this.node.title = `Workbench engine ${e.id}: ${e.state}`;
  }
}
