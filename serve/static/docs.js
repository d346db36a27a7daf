// /docs: Swagger UI from the server's own copy (no CDN), reading /openapi.json.
"use strict";
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
