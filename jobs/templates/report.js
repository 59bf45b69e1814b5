// The regression report's suite table: click a header to sort by it (again: the other
// way); `#sort=KEY` or `#sort=-KEY` in the address sorts on opening. Cells carry their
// sort value in data-v: numbers sort as numbers, empty values last either way.
const table = document.getElementById('suite-table');

function sortTable(key, desc) {
  const heads = [...table.tHead.rows[0].cells];
  const i = heads.findIndex(h => h.dataset.key === key);
  if (i < 0) return;
  const body = table.tBodies[0];
  const rows = [...body.rows];
  const val = r => {
    const v = r.cells[i].dataset.v;
    return v === '' ? null : (isNaN(parseFloat(v)) ? v : parseFloat(v));
  };
  rows.sort((a, b) => {
    const x = val(a), y = val(b);
    if (x === null) return 1;
    if (y === null) return -1;
    const c = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
    return desc ? -c : c;
  });
  rows.forEach(r => body.appendChild(r));
  heads.forEach(h => h.classList.remove('sorted', 'asc'));
  heads[i].classList.add('sorted');
  if (!desc) heads[i].classList.add('asc');
  table.dataset.sort = (desc ? '-' : '') + key;
}

table.tHead.addEventListener('click', e => {
  const h = e.target.closest('th[data-key]');
  if (h) sortTable(h.dataset.key, table.dataset.sort !== '-' + h.dataset.key);
});

const m = location.hash.match(/^#sort=(-?)([\w.-]+)$/);
if (m) sortTable(m[2], m[1] === '-');
