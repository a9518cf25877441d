import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Panel } from '@lumino/widgets';

import { EnginesView, ModelsView } from './panel';
import { ModelStatus } from './statusbar';
import { EngineStore } from './store';

const ICON_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">' +
  '<path class="jp-icon3" fill="#616161" d="M3 3h18v4H3zm0 7h18v4H3zm0 7h18v4H3z' +
  'M5 4v2h2V4zm0 7v2h2v-2zm0 7v2h2v-2z"/></svg>';

export const workbenchIcon = new LabIcon({ name: 'workbench:engines', svgstr: ICON_SVG });

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'workbench-lab:plugin',
  description: 'The Workbench panel: running engines, models on disk, the active model',
  autoStart: true,
  optional: [ILabShell, INotebookTracker, IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    tracker: INotebookTracker | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    const store = new EngineStore();
    const panel = new Panel();
    panel.id = 'workbench-panel';
    panel.addClass('jp-Workbench-panel');
    panel.title.icon = workbenchIcon;
    panel.title.caption = 'Workbench';
    const models = new ModelsView(tracker);
    panel.addWidget(new EnginesView(store));
    panel.addWidget(models);
    app.shell.add(panel, 'left', { rank: 600 });

    if (statusBar) {
      statusBar.registerStatusItem('workbench-lab:model', {
        item: new ModelStatus(store),
        align: 'left',
        rank: 100
      });
    }

    const command = 'workbench:open-panel';
    app.commands.addCommand(command, {
      label: 'Show the Workbench panel',
      execute: () => {
        app.shell.activateById(panel.id);
        void models.refresh();
      }
    });
    palette?.addItem({ command, category: 'Workbench' });
    store.start();
  }
};

export default plugin;
