// hookbox console: the only script, served from /static (the CSP allows no
// inline script). Asks before a bulk replay is submitted.
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
